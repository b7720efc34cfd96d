"""HaloNet architectures and their registry.

A small builder of our own: each architecture is data (``HaloNetConfig``: stem, stages of
bottleneck ("B") and halo self-attention ("S") blocks, activation, channel attention), built
by the few module classes below. Module and parameter names mirror timm's ``byobnet`` exactly
where weights live, so the current timm weights of the same names load strictly (which ones:
``model.checkpoint``, which refuses the 2021 ``halonet26t`` layout); nothing else of timm's generic
machinery is reproduced.

Three kinds of entries:

- timm-compatible ImageNet models (``halonet26t``, ``sehalonet33ts``, ``halonet50ts``,
  ``eca_halonext26ts``, ``halonet_h1``): same keys, shapes and logits as timm's.
- the paper's HaloNet-H0..H7 (Vaswani et al., 2021, Table 2), as configs: no public weights.
- ``halonet_compact``: a small HaloNet for 32 px grayscale inputs (the shipped default model).
"""
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import Tensor, nn

from .attention import HaloAttention, make_divisible
from .checkpoint import load_checkpoint

LABELS_DIR = Path(__file__).parent / "labels"
WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedConfig:
    """How a model's weights expect their inputs, and what their outputs mean (timm's pretrained_cfg)."""

    input_size: Tuple[int, int, int] = (3, 256, 256)
    interpolation: str = "bicubic"
    crop_pct: float = 0.95
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    label_set: str = "imagenet1k"  # a file in model/labels/
    weights: str = "timm"  # where trained weights come from: "timm", "shipped", or "none" (no public weights)
    # How an uploaded image becomes input (model/transforms.py): "center_crop" (timm's eval transform)
    # or "fit_grayscale" (grayscale, light-on-dark, fitted into the frame: the compact model's).
    preprocess: str = "center_crop"
    # What the shipped weights were trained on, as their model card says (model/weights/README.md);
    # empty where the weights come from elsewhere, and only they can say.
    trained_on: str = ""


@dataclass(frozen=True)
class StageConfig:
    out_chs: int
    stride: int
    blocks: str  # one letter per block: "B" bottleneck (3x3 conv), "S" halo self-attention
    bottle_ratio: float
    group_size: int = 0  # channels per group of the 3x3 conv; 0 = no grouping
    num_heads: Optional[int] = None  # overrides HaloNetConfig.num_heads for this stage


@dataclass(frozen=True)
class HaloNetConfig:
    stages: Tuple[StageConfig, ...]
    stem: str = "tiered"  # "7x7": one 7x7/2 conv; "tiered": three 3x3 convs; "3x3": one 3x3/1 conv
    stem_chs: int = 64
    stem_pool: bool = True  # 3x3/2 max pool after the stem (else the tiered stem's last conv strides)
    act: str = "relu"
    channel_attn: Optional[str] = None  # "se" or "eca" inside bottleneck blocks
    block_size: int = 8
    halo_size: int = 3
    num_heads: int = 8
    dim_head: Optional[int] = None
    qk_ratio: float = 1.0  # q/k width relative to the attention output (the paper's 1 / r_v)
    attn_ratio: float = 1.0  # attention output width relative to the block's bottleneck width (r_v)
    num_features: int = 0  # width of a final 1x1 conv before the head; 0 = none
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "silu": nn.SiLU}[name](inplace=True)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation (or none); timm's key layout (weight, bias, running stats)."""

    def __init__(self, num_features: int, act: Optional[str]):
        super().__init__(num_features)
        self.act = _activation(act) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class ConvNormAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: Optional[str] = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                              bias=False)
        self.bn = BatchNormAct2d(out_chs, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (timm's SEModule: 1/16 reduction rounded to multiples of 8, ReLU)."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = make_divisible(channels / 16, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


class EfficientChannelAttention(nn.Module):
    """ECA: a 1D conv across channels of the pooled features; kernel size from the channel count."""

    def __init__(self, channels: int):
        super().__init__()
        t = int(abs(math.log(channels, 2) + 1) / 2)
        kernel_size = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.mean((2, 3)).unsqueeze(1))
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1)


def _shortcut(in_chs: int, out_chs: int, stride: int) -> Optional[nn.Module]:
    if in_chs == out_chs and stride == 1:
        return None
    return ConvNormAct(in_chs, out_chs, 1, stride, act=None)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided, grouped), optional channel attention, 1x1 expand, residual."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, stage: StageConfig, cfg: HaloNetConfig):
        super().__init__()
        mid = make_divisible(out_chs * stage.bottle_ratio)
        groups = mid // stage.group_size if stage.group_size else 1
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act=cfg.act)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride, groups, act=cfg.act)
        attn: Dict[Optional[str], Callable[[int], nn.Module]] = {
            None: lambda c: nn.Identity(), "se": SqueezeExcite, "eca": EfficientChannelAttention}
        self.attn = attn[cfg.channel_attn](mid)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act=None)
        self.act = _activation(cfg.act)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.conv3_1x1(self.attn(self.conv2_kxk(self.conv1_1x1(x))))
        return self.act(x + shortcut)


class SelfAttnBlock(nn.Module):
    """1x1 reduce, halo attention (strided when the block downsamples), BN + act, 1x1 expand, residual."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, stage: StageConfig, cfg: HaloNetConfig,
                 backend: str):
        super().__init__()
        mid = make_divisible(out_chs * stage.bottle_ratio)
        attn_out = make_divisible(mid * cfg.attn_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act=cfg.act)
        self.self_attn = HaloAttention(
            mid, attn_out, stride=stride, num_heads=stage.num_heads or cfg.num_heads, dim_head=cfg.dim_head,
            block_size=cfg.block_size, halo_size=cfg.halo_size, qk_ratio=cfg.qk_ratio, backend=backend)
        self.post_attn = BatchNormAct2d(attn_out, cfg.act)
        self.conv3_1x1 = ConvNormAct(attn_out, out_chs, 1, act=None)
        self.act = _activation(cfg.act)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.conv3_1x1(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        return self.act(x + shortcut)


class Stem(nn.Module):
    def __init__(self, in_chans: int, cfg: HaloNetConfig):
        super().__init__()
        chs, act = cfg.stem_chs, cfg.act
        if cfg.stem == "7x7":
            self.conv1 = ConvNormAct(in_chans, chs, 7, 2, act=act)
        elif cfg.stem == "tiered":  # timm's "tiered": 3/8, 1/2 and all of the stem width
            self.conv1 = ConvNormAct(in_chans, 3 * chs // 8, 3, 2, act=act)
            self.conv2 = ConvNormAct(3 * chs // 8, chs // 2, 3, 1, act=act)
            self.conv3 = ConvNormAct(chs // 2, chs, 3, 1 if cfg.stem_pool else 2, act=act)
        elif cfg.stem == "3x3":
            self.conv1 = ConvNormAct(in_chans, chs, 3, 1, act=act)
        else:
            raise ValueError(f"unknown stem {cfg.stem!r}")
        self.pool = nn.MaxPool2d(3, 2, padding=1) if cfg.stem_pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for name in ("conv1", "conv2", "conv3"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return self.pool(x)


class Head(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


class HaloNet(nn.Module):
    """A HaloNet built from a ``HaloNetConfig``. ``pretrained_cfg`` says how to feed and read it."""

    def __init__(self, cfg: HaloNetConfig, num_classes: Optional[int] = None, backend: str = "auto",
                 name: str = "halonet"):
        super().__init__()
        self.name = name
        self.cfg = cfg
        num_classes = cfg.pretrained.num_classes if num_classes is None else num_classes
        self.pretrained_cfg = cfg.pretrained if num_classes == cfg.pretrained.num_classes else replace(
            cfg.pretrained, num_classes=num_classes, label_set="", weights="none", trained_on="")
        in_chans = cfg.pretrained.input_size[0]
        self.stem = Stem(in_chans, cfg)
        chs, stages = cfg.stem_chs, []
        for stage in cfg.stages:
            blocks = []
            for i, kind in enumerate(stage.blocks):
                stride = stage.stride if i == 0 else 1
                if kind == "B":
                    blocks.append(BottleneckBlock(chs, stage.out_chs, stride, stage, cfg))
                elif kind == "S":
                    blocks.append(SelfAttnBlock(chs, stage.out_chs, stride, stage, cfg, backend))
                else:
                    raise ValueError(f"unknown block kind {kind!r} in {stage.blocks!r}")
                chs = stage.out_chs
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        if cfg.num_features:
            self.final_conv = ConvNormAct(chs, cfg.num_features, 1, act=cfg.act)
            chs = cfg.num_features
        else:
            self.final_conv = nn.Identity()
        self.num_features = chs
        self.head = Head(chs, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, HaloAttention):
                m.reset_parameters()
            if isinstance(m, (BottleneckBlock, SelfAttnBlock)):  # each residual branch starts at zero
                nn.init.zeros_(m.conv3_1x1.bn.weight)

    def halo_layers(self) -> List[Tuple[str, HaloAttention]]:
        """The halo attention layers, in forward order, with their module names."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, HaloAttention)]

    def set_backend(self, backend: str) -> None:
        for _, layer in self.halo_layers():
            layer.set_backend(backend)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.final_conv(self.stages(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def _h_config(block: int, halo: int, rv: float, rb: float, l3: int, df: int, image: int) -> HaloNetConfig:
    """The paper's HaloNet-Hx (Table 2 of Vaswani et al., 2021): block and halo size, r_v, r_b, the
    depth l3 of the third stage, the width df of the final 1x1 conv, the image size.

    The paper gives no code; this reading of it reproduces its parameter counts (docs/models.md):
    stage widths 64, 128, 256, 512 times r_b, a bottleneck of 64..512 (1 / r_b of the stage),
    attention values r_v times the bottleneck (queries and keys stay at the bottleneck width),
    4 heads in the first stage and 8 after, stages of 3, 3, l3, 3 blocks, 7x7 stem.
    """
    def stage(base: int, stride: int, depth: int, heads: int) -> StageConfig:
        return StageConfig(make_divisible(base * rb), stride, "S" * depth, 1.0 / rb, num_heads=heads)

    return HaloNetConfig(
        stages=(stage(64, 1, 3, 4), stage(128, 2, 3, 8), stage(256, 2, l3, 8), stage(512, 2, 3, 8)),
        stem="7x7", block_size=block, halo_size=halo, attn_ratio=rv, qk_ratio=1.0 / rv, num_features=df,
        pretrained=PretrainedConfig(input_size=(3, image, image), weights="none"))


_IMAGENET_256 = PretrainedConfig(input_size=(3, 256, 256), crop_pct=0.95)
_IMAGENET_256_94 = PretrainedConfig(input_size=(3, 256, 256), crop_pct=0.94)

MODEL_CONFIGS: Dict[str, HaloNetConfig] = {
    # timm-compatible (state dicts of timm's current models of the same names load strictly).
    "halonet_h1": HaloNetConfig(
        stages=(StageConfig(64, 1, "SSS", 1.0), StageConfig(128, 2, "SSS", 1.0),
                StageConfig(256, 2, "S" * 10, 1.0), StageConfig(512, 2, "SSS", 1.0)),
        stem="7x7", pretrained=replace(_IMAGENET_256, weights="none")),  # timm ships it untrained
    "halonet26t": HaloNetConfig(
        stages=(StageConfig(256, 1, "BB", 0.25), StageConfig(512, 2, "BB", 0.25),
                StageConfig(1024, 2, "BS", 0.25), StageConfig(2048, 2, "SS", 0.25)),
        halo_size=2, pretrained=_IMAGENET_256),
    "sehalonet33ts": HaloNetConfig(
        stages=(StageConfig(256, 1, "BB", 0.25), StageConfig(512, 2, "BBS", 0.25),
                StageConfig(1024, 2, "BBS", 0.25), StageConfig(1536, 2, "SS", 0.333)),
        stem_pool=False, act="silu", channel_attn="se", num_features=1280, pretrained=_IMAGENET_256_94),
    "halonet50ts": HaloNetConfig(
        stages=(StageConfig(256, 1, "BBB", 0.25), StageConfig(512, 2, "BBBS", 0.25, num_heads=4),
                StageConfig(1024, 2, "BSBSBS", 0.25), StageConfig(2048, 2, "BSB", 0.25)),
        act="silu", pretrained=_IMAGENET_256_94),
    "eca_halonext26ts": HaloNetConfig(
        stages=(StageConfig(256, 1, "BB", 0.25, 16), StageConfig(512, 2, "BB", 0.25, 16),
                StageConfig(1024, 2, "BS", 0.25, 16), StageConfig(2048, 2, "SS", 0.25, 16)),
        act="silu", channel_attn="eca", halo_size=2, dim_head=16, pretrained=_IMAGENET_256_94),
    # The paper's family (Table 2): block, halo, r_v, r_b, l3, df, image size. No public weights.
    # H1 is also timm's "halonet_h1" above, which differs only in using 8 heads in the first stage.
    "halonet_h0": _h_config(8, 3, 1.0, 0.5, 7, 0, 256),
    "halonet_h1_paper": _h_config(8, 3, 1.0, 1.0, 10, 0, 256),
    "halonet_h2": _h_config(8, 3, 1.0, 1.25, 11, 0, 256),
    "halonet_h3": _h_config(10, 3, 1.0, 1.5, 12, 1024, 320),
    "halonet_h4": _h_config(12, 2, 1.0, 3.0, 12, 1280, 384),
    "halonet_h5": _h_config(14, 2, 2.5, 2.0, 23, 1536, 448),
    "halonet_h6": _h_config(8, 4, 3.0, 2.75, 24, 1536, 512),
    # The paper trains H7 at 600 px; with block 10 the second stage's 75x75 map does not divide into
    # blocks (the paper does not say how it pads), so this config uses the next size that does.
    "halonet_h7": _h_config(10, 3, 4.0, 3.5, 26, 2048, 640),
    # Compact, for 32x32 grayscale (Fashion-MNIST 28x28 padded by 2): 32 -> 16 -> 8, halo attention
    # with 4x4 blocks on the 16x16 (4x4 blocks) and 8x8 (2x2 blocks) maps.
    "halonet_compact": HaloNetConfig(
        stages=(StageConfig(96, 2, "BS", 0.5), StageConfig(192, 2, "BS", 0.5)),
        stem="3x3", stem_chs=32, stem_pool=False, block_size=4, halo_size=1, num_heads=4,
        pretrained=PretrainedConfig(input_size=(1, 32, 32), interpolation="bilinear", crop_pct=1.0,
                                    mean=(0.2860,), std=(0.3530,), num_classes=10, label_set="fashion_mnist",
                                    weights="shipped", preprocess="fit_grayscale",
                                    trained_on="Fashion-MNIST (Zalando Research): 60,000 pictures of clothing, shoes "
                                               "and bags, 28x28 grayscale, light articles centred on black; 93.3% "
                                               "of its 10,000 test images classified right")),
}


def list_models() -> List[str]:
    """Names that ``create_model`` accepts."""
    return sorted(MODEL_CONFIGS)


def _config(name: str) -> HaloNetConfig:
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODEL_CONFIGS[name]


def shipped_weights(name: str) -> Optional[Path]:
    """Path of the weights shipped in ``model/weights/`` for ``name``, or None if it ships none."""
    return WEIGHTS_DIR / f"{name}.safetensors" if _config(name).pretrained.weights == "shipped" else None


def load_labels(label_set: str) -> List[str]:
    """Class names of a label set shipped in ``model/labels/`` (one per line, in class order)."""
    path = LABELS_DIR / f"{label_set}.txt"
    if not label_set or not path.is_file():
        raise ValueError(f"no label set {label_set!r} in {LABELS_DIR}")
    return path.read_text().splitlines()


def create_model(name: str, num_classes: Optional[int] = None, checkpoint: Union[str, Path, None] = None,
                 backend: str = "auto") -> HaloNet:
    """Build a registered HaloNet; with ``checkpoint``, load its weights strictly (``load_checkpoint``)."""
    model = HaloNet(_config(name), num_classes=num_classes, backend=backend, name=name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model
