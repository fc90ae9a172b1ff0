"""freeze_startup_heap, in a process of its own (as the serving processes call it): start-up's garbage cycles are
freed, not frozen; what is alive is frozen, out of the collector's passes; what is made later is still collected."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import gc, weakref
    from workers.gc_freeze import freeze_startup_heap

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    gc.disable()  # no automatic pass may free the garbage first
    garbage = cycle()  # unreachable, but alive until a pass frees it
    kept = Node()
    freeze_startup_heap()
    assert garbage() is None, "start-up garbage was frozen instead of freed"
    assert all(o is not kept for o in gc.get_objects()), "a live start-up object is still in the collector's passes"
    later = cycle()
    gc.collect()
    assert later() is None, "garbage made after the freeze was not collected"
    print("ok")
""")


def test_start_up_garbage_freed_live_objects_frozen_later_garbage_collected():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
