"""``rag-jax plan``: ahead-of-time compilation for a TPU topology without a TPU (libtpu), the FLOP
counts against the analytic model FLOPs, the collectives parser, offline architectures."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from rag_jax import cli
from rag_jax.config import default_config, load_config
from rag_jax.models import bert
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.planning import analysis, architectures, flops, report, targets
from rag_jax.planning.programs import Program

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TINY_BERT = dict(model_type="dpr", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128)  # fmt: skip
TINY_BART = dict(model_type="bart", vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 max_position_embeddings=128)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Model folders holding only config.json: planning reads shapes, never weights."""
    root = tmp_path_factory.mktemp("tiny")
    for name, cfg in (("qe", TINY_BERT), ("gen", TINY_BART)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


def _tiny_overrides(root) -> list[str]:
    return [f"--config.model.question_encoder={root / 'qe'}", f"--config.model.generator={root / 'gen'}",
            "--config.train.batch_size=8", "--config.rag.max_combined_length=48", "--config.eval.batch_size=8",
            "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.remat=False"]  # fmt: skip


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -r requirements-aot.txt)")
def test_plan_tiny_config_on_v5e_2x2(tiny_folders, tmp_path, capsys):
    out = tmp_path / "plan.json"
    status = cli.main(["plan", "--config", "experiments/configs/paper.py:nq-token", "--topology", "v5e:2x2",
                       "--programs", "train_step,decode,exact_search", "--corpus-size", "10000",
                       "--out", str(out), *_tiny_overrides(tiny_folders)])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr()
    assert "plan for v5e:2x2" in printed.out
    assert "TPU_WORKER_HOSTNAMES" not in printed.err  # libtpu's start-up notes are hidden
    plan = json.loads(out.read_text())
    by_name = {p["name"]: p for p in plan["programs"]}
    assert set(by_name) == {"train_step", "decode_token", "exact_search"}
    for p in by_name.values():
        assert p["fits"] and p["num_devices"] == 4 and p["device_kind"].startswith("TPU v5")
        assert 0 < p["bytes_per_device"] <= p["device_memory_bytes"]
        assert p["est_step_s"] > 0 and 0 < p["est_mfu"] <= 1 and p["compile_s"] > 0
    train = by_name["train_step"]
    # FSDP over 4 devices: the parameters are gathered, the gradients reduced, inside the layer scans
    assert train["collectives"]["all-gather"]["count"] > 0
    # a small dense model without remat: the compiled matmuls are the model's (within 10%)
    for name in ("train_step", "decode_token", "exact_search"):
        p = by_name[name]
        ratio = p["hlo_flops_per_device"] * p["num_devices"] / p["model_flops"]
        assert 0.9 <= ratio <= 1.1, (name, ratio)


def test_traced_flops_count_scanned_layers():
    """BERT's layers run under lax.scan: the traced count multiplies the body by the layer count
    (XLA's cost analysis counts it once) and equals the analytic forward FLOPs."""
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)  # fmt: skip
    params = jax.eval_shape(lambda: bert.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, i: bert.encode(p, i, i, None, cfg=cfg))(params, ids)
    assert flops.traced_matmul_flops(jaxpr) == pytest.approx(flops.bert_forward(cfg, 2, 16))


def test_train_step_model_flops_are_three_forwards():
    cfg = BartConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)  # fmt: skip
    forward = flops.bart_encoder_forward(cfg, 10, 8) + flops.bart_decoder_forward(cfg, 10, 4, 8)
    enc = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    step = flops.rag_train_step(enc, cfg, batch=2, k=5, question=6, source=8, target=4)
    assert step == pytest.approx(3 * (forward + flops.bert_forward(enc, 2, 6) + 2 * 2 * 5 * 16))


HLO = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %g = bf16[4,1024]{1,0} all-gather(%y), channel_id=1, dimensions={0}
  %s = (f32[8]{0}, f32[32]{0}) all-gather-start(%x), channel_id=2
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %r = f32[8]{0} all-reduce(%a), channel_id=3, to_apply=%add
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  ROOT %o = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_weighted_by_loop_trips():
    found = analysis.collectives(HLO)
    assert found["all-reduce"] == {"count": 1, "bytes": 32}
    # two all-gathers per trip, 12 trips: 4x1024 bf16 (8 KiB) and the started one's f32[32] result
    assert found["all-gather"] == {"count": 24, "bytes": 12 * (4 * 1024 * 2 + 32 * 4)}


def test_paper_configs_resolve_offline():
    for arg in ("nq-token", "nq-sequence", "tqa-closed_book"):
        encoder, generator = architectures.model_architectures(load_config(f"experiments/configs/paper.py:{arg}"))
        assert (encoder.hidden_size, encoder.num_hidden_layers) == (768, 12)
        assert (generator.d_model, generator.encoder_layers, generator.decoder_layers) == (1024, 12, 12)


def test_unknown_model_and_topology_are_config_errors(capsys):
    config = default_config()
    config.model.question_encoder, config.model.generator = "no/such-encoder", "facebook/bart-large"
    with pytest.raises(Exception, match="config.model.question_encoder"):
        architectures.model_architectures(config)
    with pytest.raises(Exception, match="--topology"):
        targets.parse("v9z:2x2")
    assert cli.main(["plan", "--config", "experiments/configs/paper.py:nq-token", "--topology", "h100:2x2"]) == 1
    assert "a GPU topology is <gpu>:<count>" in capsys.readouterr().err


def test_a_program_the_compiler_refuses_does_not_fit():
    """TPU's compiler refuses a program whose temporaries exceed HBM; the plan reports it as not fitting,
    with the bytes asked for, and says what to change."""

    class Refused:
        def trace(self, *args):
            return jax.jit(lambda x: x @ x).trace(*args)

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(20.62G) exceeds available HBM (15.75G).")  # fmt: skip
    program = Program("decode_sequence", Refused(), (jax.ShapeDtypeStruct((4, 4), jnp.float32),), model_flops=128.0)
    original = jax.stages.Traced.lower

    def refuse(self, *a, **k):
        raise RuntimeError(message)

    chip = targets.CHIPS["v5e"]
    target = targets.Target("v5e:2x4", chip, tuple(jax.devices()[:1]))
    jax.stages.Traced.lower = refuse
    try:
        plan = analysis.analyse(program, target)
    finally:
        jax.stages.Traced.lower = original
    assert not plan.fits and plan.bytes_per_device == int(20.62 * 2**30)
    assert plan.hlo_flops_per_device == 2 * 4 * 4 * 4
    assert "needs 20.62 GiB per device" in report.advice(plan) and "eval.batch_size" in report.advice(plan)


def test_collectives_take_known_trip_counts():
    """GPU HLO carries the trip count in the while's backend config (its condition may hold no constant)."""
    hlo = HLO.replace("%n = s32[] constant(12)", "%n = s32[] parameter(1)").replace(
        "body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"7"}}')
    assert analysis.collectives(hlo)["all-gather"]["count"] == 14
    assert analysis.collectives(hlo.replace('backend_config={"known_trip_count":{"n":"7"}}', ""), 3)["all-gather"]["count"] == 6


HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="the jax CUDA plugin is not installed (pip install 'jax[cuda12]')")
def test_gpu_plan_takes_cudnn_flash_attention(tiny_folders, tmp_path):
    """bfloat16 training on H100s: the encoders' attention (even lengths, right-padded masks) is cuDNN's
    fused kernel, counted in the FLOPs; decoding compiles (its cache steps take the explicit einsums)."""
    out, hlo = tmp_path / "plan.json", tmp_path / "hlo"
    status = cli.main(["plan", "--config", "experiments/configs/paper.py:nq-token", "--topology", "h100:4",
                       "--programs", "train_step,decode", "--out", str(out), "--hlo-dir", str(hlo),
                       *_tiny_overrides(tiny_folders)])  # fmt: skip
    assert status == 0
    assert "__cudnn$fmha" in (hlo / "train_step.hlo.txt").read_text()
    by_name = {p["name"]: p for p in json.loads(out.read_text())["programs"]}
    train = by_name["train_step"]
    assert 0.9 <= train["hlo_flops_per_device"] * train["num_devices"] / train["model_flops"] <= 1.1
    assert by_name["decode_token"]["fits"]


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -r requirements-aot.txt)")
def test_plan_train_step_with_retrieval_inside_it(tiny_folders, tmp_path):
    """``corpus.retriever=device``: the step takes the questions and the corpus (embeddings and passage
    tokens split over the 4 chips), and its compiled matmuls include the search over every row."""
    plans = {}
    for retriever in ("dense", "device"):
        out = tmp_path / f"{retriever}.json"
        status = cli.main(["plan", "--config", "experiments/configs/paper.py:nq-token", "--topology", "v5e:2x2",
                           "--programs", "train_step", "--corpus-size", "20000", "--out", str(out),
                           f"--config.corpus.retriever={retriever}", *_tiny_overrides(tiny_folders)])  # fmt: skip
        assert status == 0
        (plans[retriever],) = json.loads(out.read_text())["programs"]
    host, on_device = plans["dense"], plans["device"]
    assert on_device["fits"] and on_device["settings"]["corpus_size"] == 20000
    search_flops = 2.0 * 8 * 20000 * TINY_BERT["hidden_size"]  # batch 8 over 20,000 rows
    assert on_device["model_flops"] == pytest.approx(host["model_flops"] + search_flops)
    ratio = on_device["hlo_flops_per_device"] * 4 / on_device["model_flops"]
    assert 0.9 <= ratio <= 1.2, ratio
    # each chip holds its quarter of the corpus: 20,000 x (32 float32 + 46 uint16 tokens + an int32 length) / 4
    corpus_bytes = 20000 * (32 * 4 + 46 * 2 + 4) / 4
    assert on_device["bytes_per_device"] >= host["bytes_per_device"] + corpus_bytes
