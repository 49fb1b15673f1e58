"""Start-up cost: `import fastlayers` (and so every CLI call) must not import torch._dynamo, which
costs seconds on top of `import torch`; the one dynamo marker we need is set by hand."""
import subprocess
import sys

import torch


def test_import_does_not_load_dynamo():
    code = ("import sys, torch; base = set(sys.modules); import fastlayers; "
            "new = set(sys.modules) - base; "
            "print(sorted(m for m in new if m.startswith(('torch._dynamo', 'torch._inductor'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"import fastlayers imported {out.stdout.strip()}"


def test_hand_set_constant_marker_matches_torch():
    # ops/_common.py marks request_for_trace as torch.compiler.assume_constant_result would, without
    # importing dynamo at import time. If torch changes what the decorator sets, this fails.
    from fastlayers.ops._common import request_for_trace

    def probe():
        return 0
    before = dict(vars(probe))
    torch.compiler.assume_constant_result(probe)
    added = {k: v for k, v in vars(probe).items() if k not in before}
    assert added == {"_dynamo_marked_constant": True}
    assert request_for_trace._dynamo_marked_constant is True


def test_request_for_trace_constant_under_compile():
    # The marked function is folded to a constant while tracing: a full graph, no break.
    import fastlayers as fl

    x = torch.randn(3, 8)
    w = torch.randn(8)
    f = torch.compile(lambda a, b: fl.layer_norm(a, b), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, w), torch.nn.functional.layer_norm(x, (8,), w))
