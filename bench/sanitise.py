"""What the sanitised release of a model costs on the data side (m2d/disclosure/sanitise.py).

    .venv/bin/python -m bench.sanitise [COPIES]

Writes a ResNet-18 state dict (11.7 M float32 weights, 46 MB) as torch.save's zip
checkpoint (tests/helpers/checkpoints.py), and a model COPIES times larger (default 8:
the ResNet-18's tensors repeated), sanitises each at 7 mantissa bits and prints the
seconds, the seconds per GB and what rounding removed. Read, round, sketch and write
are all in it; the report job runs it once per model file of an export.
"""
import sys
import tempfile
import time
from pathlib import Path

from m2d.disclosure import sanitise
from tests.helpers import checkpoints


def main(argv=None) -> int:
    copies = int((argv or sys.argv[1:] or ["8"])[0])
    state = checkpoints.resnet18_state()
    with tempfile.TemporaryDirectory() as tmp:
        for label, weights in (("resnet18", state),
                               (f"resnet18 x{copies}", {f"{i}.{k}": v for i in range(copies) for k, v in state.items()})):
            source = checkpoints.torch_zip(weights, Path(tmp) / "model.pt")
            size = source.stat().st_size
            started = time.perf_counter()
            summary = sanitise.sanitise(source, Path(tmp) / "out.safetensors")
            seconds = time.perf_counter() - started
            print(f"{label}: {size / 1e6:.0f} MB, {summary['float_values'] / 1e6:.1f} M floats: {seconds:.2f} s "
                  f"({seconds / (size / 1e9):.1f} s/GB); {summary['fraction_bits_removed']:.0%} of bits removed, "
                  f"largest change {summary['max_rel_change']:.3%} of a weight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
