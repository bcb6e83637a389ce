"""CLI: user errors print one paragraph and exit 2 without a traceback unless --debug."""
import subprocess
import sys


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fourbit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_unknown_key_no_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ntrain: {learning_rate: 1e-4}\n")
    r = _run("train", str(cfg))
    assert r.returncode == 2
    assert "Unknown config key `train.learning_rate`" in r.stderr and "Traceback" not in r.stderr
    r = _run("--debug", "train", str(cfg))
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_missing_config_file(tmp_path):
    r = _run("train", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml` not found" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_folder(tmp_path):
    r = _run("generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_targets_matching_nothing(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {{train: {data}}}\nlora: {{targets: [c_attn]}}\n"
                   f"output: {tmp_path / 'run'}\ntrain: {{device: cpu}}\n")
    r = _run("train", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "c_attn" in r.stderr and "q_proj" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_commands():
    r = _run("--help")
    for cmd in ("train", "generate", "chat", "merge", "export", "data", "plan"):
        assert cmd in r.stdout


def test_multi_process_launch_is_refused(tmp_path, tiny_model_dir):
    import os
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {{train: {tmp_path / 'd.jsonl'}}}\noutput: {tmp_path / 'run'}\n")
    r = subprocess.run([sys.executable, "-m", "fourbit", "train", str(cfg)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert r.returncode == 2 and "WORLD_SIZE=2" in r.stderr and "Traceback" not in r.stderr
