"""ONNX Runtime threading for timings: alternating sessions do not spin, and a
benchmark process can give every edgetok session one shared pool."""
import subprocess
import sys
import textwrap

from edgetok.runtime.backends import ort_session_options


def test_alternating_sessions_turn_spinning_off():
    opts = ort_session_options(threads=2, interleaved=True)
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    plain = ort_session_options()
    assert plain.intra_op_num_threads == 0 and plain.use_per_session_threads


def test_shared_pool_reaches_every_session_edgetok_creates(tmp_path):
    """In a fresh process (the shared pool is process-wide): export with its ORT parity
    check, then time against a baseline through validate, all on the one pool."""
    script = textwrap.dedent(f"""
        import timm, torch, edgetok
        from edgetok.runtime.backends import share_ort_threads, ort_threading, ort_session_options
        from edgetok.export import export_model
        from edgetok.validate import validate
        share_ort_threads(2)
        assert not ort_session_options(threads=1, interleaved=True).use_per_session_threads
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
        export_model(m, r"{tmp_path}/base")
        export_model(edgetok.apply(m, "tome", r=2), r"{tmp_path}/tome")
        r = validate(r"{tmp_path}/tome", backend="ort-cpu", baseline=r"{tmp_path}/base", runs=3, warmup=1)
        b, t = r["baseline"]["latency"], r["model"]["latency"]
        assert b["runs"] == t["runs"] == 3 and r["speedup"]["p50"] == b["p50_ms"] / t["p50_ms"]
        print(ort_threading())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "one shared pool of 2 threads" in out.stdout
