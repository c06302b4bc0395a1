"""scripts/benchmark_loader.py --scale: the full-size loader benchmark, run here at a tiny scale."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_builds_its_data_and_prints_both_sides(tmp_path):
    """--scale coco at 40 images prints every figure for ours and torchvision; --scale imagenet's data is
    ImageFolder's layout (class folders of hard links) and our index lists what torchvision's lists."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_loader.py"), "--scale", "coco",
                          "--root", str(tmp_path), "--coco-images", "40", "--scale-workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| |")}
    assert len(rows) == 9 and all(re.fullmatch(r" [\d,.]+ ", cell) for cells in rows.values() for cell in cells), out.stdout
    assert re.search(r"coco: 40 entries, [\d,]+ annotations", out.stdout)

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark_scale
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from torchvision import datasets

    from utils.inputs.data import SafeImageFolder
    train = benchmark_scale.make_imagenet(tmp_path, 3, 4)
    assert benchmark_scale.make_imagenet(tmp_path, 3, 4) == train  # built once, reused
    assert list(SafeImageFolder(train).samples) == datasets.ImageFolder(train).samples
    assert len(datasets.ImageFolder(train)) == 12
