"""``rag-jax train / eval / export`` end to end on a tiny task (synthetic knowledge base, tiny random
encoder and BART, ScaNN over the embedded passages): training with retrieval in the loop,
evaluation, checkpoints, HF export with equal losses, exact resume after SIGKILL, and a real
two-process multi-host run equal to one process."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rag_jax import cli
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.quickstart import task as quickstart_task
from rag_jax.training.metric_writer import read_metrics

PROGRESS_BAR = re.compile(r"\[\d+:\d\d")  # tqdm's elapsed time
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_ENCODER = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                          max_position_embeddings=64)  # fmt: skip
TINY_BART = BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                       dropout=0.1)  # fmt: skip
CONFIG_FILE = """
import json, ml_collections

def get_config(path):
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return quickstart_task.prepare_task(str(root), entities=16, generator=TINY_BART, encoder=TINY_ENCODER, index="scann",
                                   embed_max_length=32, progress=False)  # fmt: skip


def write_config(task, tmp_path, run_dir: str, variant: str = "token", rag=None, **train) -> str:
    cfg = quickstart_task.run_config(
        task, variant, run_dir,
        data={"max_question_length": 16, "max_target_length": 8},
        rag={"k": 2, "max_combined_length": 48, **(rag or {})},
        train={"steps": 6, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 1, "epsilon": 0.0,
               "clip_norm": 1.0, "log_every": 1, "eval_every": 3, "save_every": 2, **train},
        eval={"k": 2, "batch_size": 4, "max_examples": 4, "max_length": 6},
        mesh={"data": -1},
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "config.py").write_text(CONFIG_FILE)
    return f"{tmp_path / 'config.py'}:{tmp_path / 'config.json'}"


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_train_eval_export_end_to_end(task, tmp_path, capsys):
    """With a learned retrieval score scale (from 4): the exported folder and its (scaled) passage
    embeddings give transformers rag_jax's doc scores, and the losses with them agree."""
    import torch
    from transformers import RagTokenForGeneration

    from rag_jax.config import saved_run_config
    from rag_jax.retrieval import load_embeddings
    from rag_jax.training import components, evaluate

    run_dir = str(tmp_path / "run")
    spec = write_config(task, tmp_path, run_dir, rag={"score_scale": 4.0, "learn_score_scale": True},
                        score_scale_learning_rate=0.1)  # fmt: skip
    assert cli.main(["train", "--config", spec, "--no-progress"]) == 0
    records = read_metrics(run_dir)
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for v in losses(run_dir).values())
    for r in (r for r in records if "train/loss" in r):  # retrieval diagnostics: k = 2 documents per question
        assert 0 <= r["train/retrieval_entropy"] <= np.log(2) + 1e-6
        assert 1 <= r["train/distinct_passages"] <= 2 * 8  # k x batch size
    dev = [r for r in records if "dev/em" in r]
    assert [r["step"] for r in dev] == [3, 6] and all({"dev/f1", "dev/recall_at_k"} <= set(r) for r in dev)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tb")))
    assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit()) == [2, 4, 6]
    with open(os.path.join(run_dir, "checkpoints", "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 6
    capsys.readouterr()

    assert cli.main(["eval", "--run", run_dir, "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 6 and {"em", "f1", "recall_at_k"} <= set(result)
    with open(result["predictions"]) as f:
        predictions = [json.loads(line) for line in f]
    assert len(predictions) == 4 and all(len(p["retrieved"]) == 2 for p in predictions)
    for p in predictions:  # the retrieved passages' corpus rows and scores, best first
        assert len(p["retrieved_ids"]) == len(p["doc_scores"]) == 2 and p["doc_scores"][0] >= p["doc_scores"][1]

    # a split in the generation format is scored as one: BLEU-1 and ROUGE-L next to EM / F1
    generation = tmp_path / "test_generation.jsonl"
    generation.write_text("".join(json.dumps({"input": p["question"], "target": p["answers"][0]}) + "\n"
                                  for p in predictions))  # fmt: skip
    assert cli.main(["eval", "--run", run_dir, "--split", "test", f"--config.data.test={generation}",
                     f"--predictions={tmp_path / 'generation_predictions.jsonl'}"]) == 0  # fmt: skip
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"em", "f1", "bleu1", "rouge_l"} <= set(scored) and "label_accuracy" not in scored

    # the latest checkpoint's array data files truncated: eval falls back to the previous one, and says only that
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    for data_file in (damaged / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d").iterdir():
        os.truncate(data_file, data_file.stat().st_size // 2)
    args = ["eval", "--run", str(damaged), "--split", "test", f"--config.run_dir={damaged}"]
    fallback = rag_jax_process(args, 8, stderr=subprocess.PIPE)
    output, errors = fallback.communicate(timeout=300)
    assert fallback.returncode == 0 and json.loads(output.strip().splitlines()[-1])["step"] == 4, errors[-3000:]
    lines = [line for line in errors.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert [line.split(" in ")[0] for line in lines] == ["warning: checkpoint step 6"], errors[-3000:]

    out = str(tmp_path / "export")
    assert cli.main(["export", "--run", run_dir, "--out", out]) == 0
    assert "holds the passage embeddings times" in capsys.readouterr().out
    assert {"passages.tsv", "embeddings", "index", "generator_tokenizer", "question_encoder_tokenizer"} <= set(
        os.listdir(out)
    )
    cfg = saved_run_config(run_dir)
    model, _ = evaluate.load_trained_model(cfg)
    assert model.score_scale != pytest.approx(4.0, rel=1e-3)  # learned: the checkpoint's scale, not the initial one
    hf = RagTokenForGeneration.from_pretrained(out).eval()

    # transformers' question vector . the exported embeddings == rag_jax's scaled doc scores
    retriever = components.build_retriever(cfg, model, *components.tokenizers(cfg), k=2)
    found = retriever.retrieve(["Where was Ada born?", "What is the job of Bo?"], score_scale=model.score_scale)
    exported_BxKxD = np.asarray(load_embeddings(os.path.join(out, "embeddings")))[found.doc_ids_BxK]
    with torch.no_grad():  # the run's BERT question encoder is exported as a DPRQuestionEncoder: its [CLS] vector
        q_hf = hf.question_encoder(torch.tensor(found.question_input_ids_BxSq),
                                   attention_mask=torch.tensor(found.question_attention_mask_BxSq))[0]  # fmt: skip
    doc_scores_hf = np.einsum("bd,bkd->bk", q_hf.numpy(), exported_BxKxD)
    np.testing.assert_allclose(doc_scores_hf, found.doc_scores_BxK, rtol=1e-5, atol=1e-5)
    B, K, S = found.context_input_ids_BxKxS.shape
    ctx_ids = found.context_input_ids_BxKxS.reshape(B * K, S)
    ctx_mask = found.context_attention_mask_BxKxS.reshape(B * K, S)
    labels = found.context_input_ids_BxKxS[:, 0, 1:6]  # the first document's first tokens
    ours = np.asarray(model.loss(ctx_ids, ctx_mask, found.doc_scores_BxK, labels, variant="token", n_docs=K))
    with torch.no_grad():
        theirs = hf(context_input_ids=torch.tensor(ctx_ids), context_attention_mask=torch.tensor(ctx_mask),
                    doc_scores=torch.tensor(doc_scores_hf), labels=torch.tensor(labels), n_docs=K).loss.numpy()  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)

    # transformers' own retrieval over the exported passages and FAISS index: rag_jax's exact top-k, and
    # transformers' greedy generate from the question strings gives rag-jax eval's predictions
    from transformers import RagRetriever

    retriever_hf = RagRetriever.from_pretrained(out, index_name="custom", passages_path=os.path.join(out, "hf_passages"),
                                                index_path=os.path.join(out, "hf_index.faiss"))  # fmt: skip
    hf_rag = RagTokenForGeneration.from_pretrained(out, retriever=retriever_hf).eval()
    questions = [p["question"] for p in predictions]
    found = retriever.retrieve(questions, score_scale=model.score_scale)
    exact_BxK = np.argsort(-(found.question_vectors_BxD @ np.asarray(load_embeddings(os.path.join(out, "embeddings"))).T),
                           axis=1, kind="stable")[:, :2]  # fmt: skip
    q_ids = retriever_hf.question_encoder_tokenizer(questions, padding=True, return_tensors="pt")
    with torch.no_grad():
        q_vectors = hf_rag.question_encoder(q_ids["input_ids"], attention_mask=q_ids["attention_mask"])[0].numpy()
    np.testing.assert_allclose(q_vectors, found.question_vectors_BxD, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        retrieved = retriever_hf(q_ids["input_ids"].numpy(), q_vectors, n_docs=2, return_tensors="np")
        generated = hf_rag.generate(input_ids=q_ids["input_ids"], attention_mask=q_ids["attention_mask"], n_docs=2,
                                    num_beams=1, max_length=cfg.eval.max_length)  # fmt: skip
    np.testing.assert_array_equal(retrieved["doc_ids"], exact_BxK)
    np.testing.assert_array_equal(found.doc_ids_BxK, exact_BxK)
    texts = retriever_hf.generator_tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert [t.strip() for t in texts] == [p["prediction"] for p in predictions]


def test_retrieval_inside_the_step_trains_like_host_retrieval(task, tmp_path, capsys):
    """``corpus.retriever=device`` (8 simulated devices, no index needed): the same per-step losses as host
    retrieval with the current encoder every step (the tiny corpus's ScaNN index is brute force), dev
    evaluation over the device corpus, and ``rag-jax eval`` of the run."""
    runs = {}
    for retriever in ("dense", "device"):
        run_dir = str(tmp_path / retriever)
        (tmp_path / retriever).mkdir()
        spec = write_config(task, tmp_path / retriever, run_dir, steps=4, eval_every=4, save_every=4,
                            retrieval_refresh_every=1)  # fmt: skip
        args = ["train", "--config", spec, "--no-progress", f"--config.corpus.retriever={retriever}"]
        if retriever == "device":
            args.append("--config.corpus.index=")
        assert cli.main(args) == 0
        runs[retriever] = read_metrics(run_dir)
    host, on_device = ({r["step"]: r for r in runs[name] if "train/loss" in r} for name in ("dense", "device"))
    assert sorted(on_device) == [1, 2, 3, 4]
    for step in on_device:
        np.testing.assert_allclose(on_device[step]["train/loss"], host[step]["train/loss"], rtol=1e-4)
        assert on_device[step]["train/distinct_passages"] == host[step]["train/distinct_passages"]
    dev = {name: [r for r in runs[name] if "dev/em" in r][-1] for name in runs}
    assert dev["device"]["dev/recall_at_k"] == dev["dense"]["dev/recall_at_k"]
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(tmp_path / "device"), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and {"em", "recall_at_k"} <= set(result)


def test_unknown_override_is_an_error(task, tmp_path, capsys):
    spec = write_config(task, tmp_path, str(tmp_path / "run"))
    assert cli.main(["train", "--config", spec, "--config.train.stepz=3"]) == 1
    assert capsys.readouterr().err == (f"rag-jax train: config ({spec}): override '--config.train.stepz=3': no field "
                                       "'train.stepz' in the config; did you mean 'train.steps'?\n")  # fmt: skip


# -- subprocess runs -----------------------------------------------------------------------------


def rag_jax_process(args, devices: int, stderr=subprocess.STDOUT, **env) -> subprocess.Popen:
    """``rag-jax args`` in a new process with ``devices`` CPU devices and this process's matmul precision
    (stderr merged into stdout unless ``stderr`` says otherwise)."""
    environment = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                   "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
                   "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])), **env}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "rag_jax", *args], env=environment, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def run_until(args, run_dir, step: int, sig: int) -> subprocess.Popen:
    """Start ``rag-jax args`` and send it ``sig`` once it has logged ``step``."""
    process = rag_jax_process(args, 8)
    deadline = time.time() + 300
    while max(losses(run_dir), default=0) < step:
        assert process.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=300)
    return process


def test_preemption_and_sigkill_then_resume_give_the_same_losses(task, tmp_path):
    """A run pre-empted (SIGTERM) saves a checkpoint at the step it reached and exits cleanly; resumed,
    then killed with SIGKILL (checkpoints every 2 steps; retrieval refreshed every 3 steps, so the
    checkpointed retrieval encoder is older than the trained one) and resumed again, it logs exactly
    the per-step losses of an uninterrupted run."""
    settings = ["--no-progress", "--config.train.steps=9", "--config.train.retrieval_refresh_every=3",
                "--config.data.dev="]  # fmt: skip
    reference_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    assert cli.main(["train", "--config", write_config(task, tmp_path, reference_dir), *settings]) == 0  # 8 devices
    (tmp_path / "k").mkdir()
    args = ["train", "--config", write_config(task, tmp_path / "k", run_dir), *settings]

    preempted = run_until(args, run_dir, 2, signal.SIGTERM)
    assert preempted.returncode == 0, preempted.stdout.read()[-3000:]
    stopped_at = max(losses(run_dir))
    assert str(stopped_at) in os.listdir(os.path.join(run_dir, "checkpoints"))  # saved at the step it reached
    killed = run_until(args, run_dir, stopped_at + 3, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and max(losses(run_dir)) < 9
    finish(rag_jax_process(args, 8))
    expected, resumed = losses(reference_dir), losses(run_dir)
    assert sorted(resumed) == list(range(1, 10))
    assert [resumed[s] for s in range(1, 10)] == [expected[s] for s in range(1, 10)]


def test_a_non_finite_loss_stops_the_run_with_one_line(task, tmp_path):
    run_dir = str(tmp_path / "run")
    args = ["train", "--config", write_config(task, tmp_path, run_dir), "--no-progress", "--config.data.dev=",
            "--config.train.learning_rate=inf", "--config.train.save_every=100"]  # fmt: skip
    process = rag_jax_process(args, 8, stderr=subprocess.PIPE)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 1 and "Traceback" not in errors, errors[-3000:]
    (line,) = [line for line in errors.splitlines() if line.strip()]
    assert re.fullmatch(r"rag-jax train: training stopped: non-finite loss or gradient at step \d \(batch examples "
                        r".*kb/train.jsonl:\d+.*\); the last good checkpoint is kept in .*/checkpoints; "
                        r"train.on_nonfinite=skip skips such steps instead", line), line  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(task, tmp_path, capsys):
    """Two ``rag-jax train`` processes (2 CPU devices each, gloo collectives, loopback coordinator)
    give the per-step losses of one process with the same 4 devices' mesh and global batch; only
    process 0 writes logs; the checkpoint restores in a single process (``rag-jax eval``, 8 devices).
    The two processes search a 3-shard exact index split between them (``ProcessShardedIndex``: shards 0
    and 2 on one, 1 on the other), the single process the same passages in one exact index."""
    from rag_jax.retrieval import ExactIndex, build_sharded, load_embeddings

    embeddings = np.asarray(load_embeddings(task.embeddings))
    ExactIndex.build(embeddings).save(str(tmp_path / "exact"))
    build_sharded(embeddings, 3, kind="exact").save(str(tmp_path / "sharded"))
    settings = ["--no-progress", "--config.train.steps=4", "--config.train.eval_every=4"]
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    single_process = rag_jax_process(["train", "--config", write_config(task, tmp_path, single_dir), *settings,
                                      f"--config.corpus.index={tmp_path / 'exact'}"], 4)  # fmt: skip

    (tmp_path / "m").mkdir()
    spec = write_config(task, tmp_path / "m", multi_dir)
    settings.append(f"--config.corpus.index={tmp_path / 'sharded'}")
    address = f"localhost:{free_port()}"
    cluster = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2"}
    processes = [rag_jax_process(["train", "--config", spec, *settings], 2, **cluster, JAX_PROCESS_ID=str(i))
                 for i in range(2)]  # fmt: skip
    for p in [single_process, *processes]:
        finish(p)
    single, multi = losses(single_dir), losses(multi_dir)
    assert sorted(multi) == [1, 2, 3, 4]
    # The first step's loss (same parameters, same global batch) agrees to float32 rounding; later steps
    # differ only by the collectives' summation order, which Adam's division by sqrt(v) amplifies
    # (see ADAM_ATOL in test_train.py).
    np.testing.assert_allclose(multi[1], single[1], rtol=2e-6)
    np.testing.assert_allclose([multi[s] for s in range(2, 5)], [single[s] for s in range(2, 5)], rtol=1e-4)
    steps_logged = [r["step"] for r in read_metrics(multi_dir) if "train/loss" in r]
    assert steps_logged == [1, 2, 3, 4]  # one writer
    capsys.readouterr()
    # evaluation split over two processes (each retrieves for its share of every batch, one program decodes
    # the batch on all 4 devices, process 0 gathers and writes) equals one process's; 7 examples in batches
    # of 4, so the second process has one real example in the last batch
    settings = ["--split", "dev", "--config.eval.max_examples=7"]
    assert cli.main(["eval", "--run", multi_dir, *settings, f"--predictions={tmp_path / 'one.jsonl'}"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["step"] == 4
    evals = [rag_jax_process(["eval", "--run", multi_dir, *settings, f"--predictions={tmp_path / 'two.jsonl'}"], 2,
                             stderr=subprocess.PIPE, **cluster, JAX_PROCESS_ID=str(i)) for i in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in evals]
    assert [p.returncode for p in evals] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert not [line for line in outputs[1][0].splitlines() if line.startswith("{")]  # process 1 prints no result
    multi = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert {key: v for key, v in multi.items() if key != "predictions"} == {
        key: v for key, v in single.items() if key != "predictions"
    }
    one, two = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()] for name in ("one.jsonl", "two.jsonl"))
    assert len(one) == 7 and two == one


def test_end_to_end_retriever_training_with_full_reindex_resumes_exactly_and_exports(task, tmp_path):
    """``train.doc_encoder=trained, index_refresh=full`` (re-index every 3 steps, swapped in 2 later):
    each step retrieves from the scheduled generation; a run killed with SIGKILL while a generation is
    being built (its folder then left unfinished) and resumed logs the per-step losses of an
    uninterrupted run; the export holds the trained document encoder as a ``DPRContextEncoder`` and the
    corpus as it embeds it."""
    import torch
    from transformers import AutoTokenizer, DPRContextEncoder

    from rag_jax.retrieval import PassageStore, load_embeddings

    settings = ["--no-progress", "--config.train.steps=9", "--config.data.dev=", "--config.model.doc_max_length=32",
                "--config.train.doc_encoder=trained", "--config.train.index_refresh=full",
                "--config.train.reindex_every=3", "--config.train.reindex_lag=2", "--config.train.reindex_batch_size=16"]  # fmt: skip
    reference_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    assert cli.main(["train", "--config", write_config(task, tmp_path, reference_dir), *settings]) == 0
    records = [r for r in read_metrics(reference_dir) if "train/loss" in r]
    assert [r["train/index_generation"] for r in records] == [0] * 5 + [3] * 3 + [6]  # swaps after steps 5 and 8
    # kept: the previous and the current generation, and the one built from the last step's snapshot
    assert sorted(os.listdir(os.path.join(reference_dir, "index_generations"))) == [
        "step-00000003", "step-00000006", "step-00000009"]  # fmt: skip

    (tmp_path / "k").mkdir()
    args = ["train", "--config", write_config(task, tmp_path / "k", run_dir), *settings]
    killed = run_until(args, run_dir, 4, signal.SIGKILL)  # generation 3 is being built until step 5
    assert killed.returncode == -signal.SIGKILL and max(losses(run_dir)) < 9
    generation = os.path.join(run_dir, "index_generations", "step-00000003")
    if os.path.exists(os.path.join(generation, "COMPLETE")):  # what a kill half-way through its build leaves
        os.remove(os.path.join(generation, "COMPLETE"))
    shutil.rmtree(os.path.join(generation, "index"), ignore_errors=True)
    finish(rag_jax_process(args, 8))
    expected, resumed = losses(reference_dir), losses(run_dir)
    assert [resumed[s] for s in range(1, 10)] == [expected[s] for s in range(1, 10)]

    out = str(tmp_path / "export")
    assert cli.main(["export", "--run", reference_dir, "--out", out]) == 0
    dpr = DPRContextEncoder.from_pretrained(os.path.join(out, "doc_encoder")).eval()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "doc_encoder"))
    with PassageStore.open(task.passages) as store:
        passages = store.slice(0, 4)
    enc = tokenizer([p.title for p in passages], [p.text for p in passages], padding="max_length", truncation=True,
                    max_length=32, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        vectors = dpr(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(load_embeddings(os.path.join(out, "embeddings"))[0:4]), vectors, atol=1e-4)
