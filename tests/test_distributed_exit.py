"""The distributed clean-up is registered with atexit when a group is made, not on import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch.distributed as dist

from hyperdiff.tuner.distributed import group as group_module


def test_importing_hyperdiff_registers_no_exit_handler():
    script = textwrap.dedent("""
        import atexit
        seen = []
        register = atexit.register
        def recording(fn, *args, **kwargs):
            seen.append(getattr(fn, "__module__", "") or "")
            return register(fn, *args, **kwargs)
        atexit.register = recording
        import hyperdiff
        print([m for m in seen if m.startswith("hyperdiff")])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip() == "[]"


def test_the_first_group_registers_the_clean_up_once(monkeypatch):
    registered = []
    monkeypatch.setattr(group_module.atexit, "register", registered.append)
    monkeypatch.setattr(group_module, "_EXIT_REGISTERED", False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        first = group_module.Group()
        second = group_module.Group()
        assert registered == [group_module._at_exit]
        first.close()
        second.close()
    finally:
        dist.destroy_process_group()
