"""Grad-CAM maps of several checkpoints on the same images, side by side (the paper's Figure 1).

    python scripts/gradcam.py runs/r50 runs/r50-se runs/r50-simam --images /data/imagenet/val/n01440764 -o fig1.png
    python scripts/gradcam.py simam_r50.pth.tar --images cat.jpg dog.jpg --labels imagenet_names.txt
    python scripts/gradcam.py runs/cifar100-resnet20-simam-param0.0001-seed0 --images cifar_pngs/ --layer layer3.2

One row per image, one column per checkpoint (the plain image first). Each panel is the Grad-CAM map
of the target class over the image as the model sees it: the true class when the image sits in a
folder named after one of the model's classes (an ImageFolder val/ split), else the model's top-1
prediction; under it, the class name and the model's probability for it.

A checkpoint is a .pth.tar file or a run folder, ours or the reference's (utils.reporting.models identifies
arch, attention and lambda as scripts/eval_checkpoints.py does). Preprocessing follows the model:
ImageNet archs Resize + CenterCrop (the run's --val-resize-size / --val-crop-size when its args.json
is there, else 256 / 224) with ImageNet mean/std; CIFAR archs a centre square scaled to 32x32 with
CIFAR mean/std. Arch, attention, its parameter and the sizes are the checkpoint's record unless given
(a given value that differs is said). Class names: --labels FILE (one per line), else the names the
checkpoint records, else the run's data folder (ImageFolder class folders or the CIFAR archive's
names) when args.json records one that still exists, else indices.
Layer: the last block of the last stage (e.g. layer4.1 of a ResNet-18), or --layer NAME
(any name of model.named_modules() whose output is a feature map).
Grad-CAM itself is torchcam's (torchcam.methods.GradCAM); see docs/figures.md for why that library.
"""
import argparse
import difflib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from utils import UserError, error_line  # noqa: E402
from utils.args import check_number  # noqa: E402
from utils.reporting.models import load_model  # noqa: E402
from utils.reporting.runs import ARCH_LABEL, attention_label  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DISPLAY = 160  # px: panels are drawn at least this large (a CIFAR crop is 32 px)


# ---------------------------------------------------------------- the map

def default_layer(model):
    """The last block of the last stage: the last module kept in an nn.Sequential (a stage) whose
    class is a network's own (a block, not a torch.nn layer) and that is not, or is not inside,
    an attention module. ResNet: layer4.<last>; CIFAR ResNets: layer3.<last>; MobileNetV2: its last
    feature block (the final 1x1 ConvBNReLU)."""
    from networks.attentions import ATTENTIONS
    attention_classes = tuple(ATTENTIONS.values())
    inside_attention, last = [], None
    for name, module in model.named_modules():
        if isinstance(module, attention_classes):
            inside_attention.append(name + ".")
            continue
        if any(name.startswith(p) for p in inside_attention):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
        own = not type(module).__module__.startswith("torch.")
        if own and isinstance(parent, nn.Sequential) and any(isinstance(m, nn.Conv2d) for m in module.modules()):
            last = name
    if last is None:
        raise UserError(f"no block found in {type(model).__name__}: pass --layer NAME")
    return last


def check_layer(model, layer):
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise UserError(f"no layer {layer!r} in {type(model).__name__} (default: {default_layer(model)}{hint}; "
                        f"names as in model.named_modules())")


def gradcam(model, x, layer, target=None):
    """Grad-CAM of class `target` (None: the top-1 prediction) at `layer` for one image x [1, 3, H, W].

    Returns (map [H, W] in [0, 1] at the input's resolution, target class, its softmax probability,
    top-1 class)."""
    from torchcam.methods import GradCAM
    check_layer(model, layer)
    model.eval()
    with GradCAM(model, layer, input_shape=tuple(x.shape[1:])) as cam, torch.enable_grad():
        logits = model(x)
        fmap = cam.hook_a[0]
        if fmap is None or fmap.dim() != 4:
            shape = "nothing" if fmap is None else tuple(fmap.shape)
            raise UserError(f"layer {layer!r} gives {shape}, not a feature map [N, C, H, W]; "
                            f"choose a conv block (default: {default_layer(model)})")
        top1 = int(logits.argmax(1))
        target = top1 if target is None else int(target)
        if not 0 <= target < logits.shape[1]:
            raise UserError(f"class {target} is out of range for a {logits.shape[1]}-class model")
        try:
            heat = cam(class_idx=target, scores=logits)[0]  # [1, h, w], min-max normalised
        except RuntimeError as e:  # e.g. an in-place op after the chosen layer
            raise UserError(f"Grad-CAM failed at layer {layer!r} ({str(e).splitlines()[0]}); try another --layer") from None
        prob = float(logits.detach().softmax(1)[0, target])
    heat = F.interpolate(heat[None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return heat.clamp(0, 1), target, prob, top1


# ---------------------------------------------------------------- inputs

def preprocess(info, resize=None, crop=None):
    """(view, to_tensor): view maps a PIL image to what the model sees (cropped, unnormalised PIL);
    to_tensor maps that view to the normalised [1, 3, H, W] input."""
    from torchvision import transforms
    if info["dataset"] == "cifar":
        from utils.inputs.cifar import CIFAR_MEAN as mean, CIFAR_STD as std
        view = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])
    else:
        from utils.inputs.data import IMAGENET_MEAN as mean, IMAGENET_STD as std
        a = info["args"] or {}
        for flag, mine, theirs in (("--resize", resize, a.get("val_resize_size")), ("--crop", crop, a.get("val_crop_size"))):
            if mine and theirs and mine != theirs:
                print(f"note: {info['path']}: {flag} {mine} given; its run was validated with {theirs}", file=sys.stderr)
        crop = crop or a.get("val_crop_size") or 224
        resize = resize or a.get("val_resize_size") or round(crop * 256 / 224)
        view = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])
    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    return view, lambda img: norm(img)[None]


def image_files(paths, limit):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            by_folder = {}
            for f in found:
                by_folder.setdefault(f.parent, []).append(f)
            # Round-robin over the folders: the first rows of a val/ split show one image per class.
            files += [f for k in range(max(map(len, by_folder.values()), default=0))
                      for group in by_folder.values() if k < len(group) for f in group[k:k + 1]]
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"image not found: {p}")
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {' '.join(map(str, paths))}")
    return files[:limit]


def read_image(path):
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises several types for unreadable files
        raise UserError(f"cannot read image {path} ({type(e).__name__})") from None


def read_labels(path):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--labels file not found: {p}")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def class_names(info, labels=None):
    """Names of the model's classes: `labels`, else the run's data folder's, else None."""
    n = info["num_classes"]
    if labels is not None:
        if len(labels) != n:
            raise UserError(f"--labels has {len(labels)} names but {info['path']} classifies {n} classes")
        return labels
    a = info["args"] or {}
    if len(a.get("class_names") or ()) == n:  # recorded in the checkpoint (or args.json) since they are
        return list(a["class_names"])
    try:
        if info["dataset"] == "cifar" and a.get("dataset_dir") and a.get("dataset"):
            from utils.inputs.cifar import read_classes
            names = read_classes(a["dataset_dir"], a["dataset"])
        elif a.get("data"):  # ImageFolder: the class index is the sorted folder names' order
            root = Path(a["data"])
            split = next((root / s for s in ("train", "val") if (root / s).is_dir()), None)
            names = sorted(d.name for d in split.iterdir() if d.is_dir()) if split else []
        else:
            return None
    except UserError:  # the run's data has moved: indices it is
        return None
    return names if len(names) == n else None


def column_title(info):
    label = ARCH_LABEL.get(info["arch"], info["arch"])
    att = info["attention_type"]
    return label if att == "none" else f"{label} + {attention_label(att, info['attention_param'])}"


# ---------------------------------------------------------------- the figure

def compute_panels(models, files, layer=None, labels=None, resize=None, crop=None):
    """For each image, the plain view and each model's panel: dicts with view (PIL), heat, name, prob."""
    rows = []
    prepared = []
    for model, info in models:
        names = class_names(info, labels)
        view, to_tensor = preprocess(info, resize, crop)
        prepared.append((model, info, names, view, to_tensor, layer or default_layer(model)))
    for f in files:
        img = read_image(f)
        truth = f.parent.name
        row = {"file": f, "plain": prepared[0][3](img), "truth": None, "panels": []}
        for model, info, names, view, to_tensor, lay in prepared:
            v = view(img)
            target = names.index(truth) if names and truth in names else None
            if target is not None:
                row["truth"] = truth
            heat, cls, prob, top1 = gradcam(model, to_tensor(v), lay, target)
            name = lambda i: names[i] if names else f"class {i}"  # noqa: E731
            row["panels"].append({"view": v, "heat": heat, "class": cls, "name": name(cls), "prob": prob,
                                  "top1": top1, "top1_name": name(top1), "layer": lay})
        rows.append(row)
    return rows


def overlay(view, heat, alpha=0.5):
    """The image (scaled to at least DISPLAY px) with the map in the jet colours on top."""
    from PIL import Image
    from torchcam.utils import overlay_mask
    scale = max(1, -(-DISPLAY // max(view.size)))
    big = view.resize((view.width * scale, view.height * scale), Image.BICUBIC)
    return overlay_mask(big, Image.fromarray(heat.numpy(), mode="F"), alpha=alpha)


def make_figure(rows, titles, title=None):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    ncol = 1 + len(titles)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.3 * ncol, 2.5 * len(rows) + (0.4 if title else 0)),
                             squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(row["plain"])
        ax.set_xlabel(row["truth"] or row["file"].name, fontsize=8)
        for c, p in enumerate(row["panels"], start=1):
            ax = axes[r][c]
            ax.imshow(overlay(p["view"], p["heat"]))
            text = f"{p['name']}: {p['prob']:.2f}"
            if p["top1"] != p["class"]:
                text += f"\n(top-1: {p['top1_name']})"
            ax.set_xlabel(text, fontsize=8)
    for c, t in enumerate(["image"] + titles):
        axes[0][c].set_title(t, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig, out, dpi):
    """savefig; a PNG is then stored with a 256-colour palette: the panels are photos under a smooth
    colour map, and a full-colour PNG of them is several times larger for no visible difference."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image
    if out.suffix.lower() != ".png":
        fig.savefig(out, dpi=dpi)
    else:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format="png")
        with Image.open(buf) as img:
            img.convert("RGB").quantize(colors=256).save(out, optimize=True)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT_OR_RUN", help=".pth.tar files or run folders")
    p.add_argument("--images", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="image files, or folders searched recursively (one image per sub-folder in turn)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line in class-index order")
    p.add_argument("--layer", metavar="NAME", help="module name (default: the last block of the last stage)")
    p.add_argument("-o", "--output", default="gradcam.png", help="image file to write (default: gradcam.png)")
    p.add_argument("-n", "--max-images", type=int, default=8, dest="max_images",
                   help="at most this many images, one row each (default: 8)")
    p.add_argument("-a", "--arch", default=None, help="for checkpoints that do not record it")
    p.add_argument("--attention_type", default=None, help="for checkpoints that do not record it")
    p.add_argument("--attention_param", type=float, default=None, help="SimAM lambda for the reference's checkpoints")
    p.add_argument("--resize", type=int, default=None, help="ImageNet models: resize the short side to this")
    p.add_argument("--crop", type=int, default=None, help="ImageNet models: centre crop of this size")
    p.add_argument("--title", default=None)
    p.add_argument("--dpi", type=int, default=100, help="resolution of the written image (default: 100)")
    args = p.parse_args(argv)
    try:
        for flag, v in (("--max-images", args.max_images), ("--resize", args.resize), ("--crop", args.crop),
                        ("--dpi", args.dpi)):
            check_number(flag, v, 1)
        check_number("--attention_param", args.attention_param, 0, low_open=True)  # the module checks the rest
        with torch.no_grad():  # gradcam() turns it on where it needs it
            models = [load_model(c, args.arch, args.attention_type, args.attention_param) for c in args.checkpoints]
            labels = read_labels(args.labels) if args.labels else None
            rows = compute_panels(models, image_files(args.images, args.max_images), args.layer, labels,
                                  args.resize, args.crop)
        fig = make_figure(rows, [column_title(info) for _, info in models], args.title)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        save(fig, out, args.dpi)
    except UserError as e:
        sys.exit(f"error: {error_line(e)}")
    layers = sorted({p["layer"] for p in rows[0]["panels"]})
    print(f"wrote {out} ({len(rows)} images x {len(models)} checkpoints, layer {', '.join(layers)})")


if __name__ == "__main__":
    main()
