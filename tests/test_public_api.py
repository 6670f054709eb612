"""Every name `kpig_trainer` exports resolves, lazily: importing the package loads no torch."""

import subprocess
import sys

import kpig_trainer


def test_every_export_resolves_to_a_documented_object():
    for name in kpig_trainer.__all__:
        value = getattr(kpig_trainer, name)
        if name != "__version__":
            assert value.__doc__, f"{name} has no docstring"


def test_import_is_lazy():
    code = "import sys, kpig_trainer, kpig_trainer.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
