"""The MobileNetV2 backbone of the ProxylessNAS space: channels, strides and searched layers.

At full size: a 3x3 stem conv (3 -> 40, stride 2), a fixed MBConv 40 -> 24 (kernel 3,
expansion 1), 21 searched layers, a 1x1 conv 432 -> 1728, global pooling and a linear
classifier. The searched layers form five stages of four layers and one final layer. The
first layer of each stage changes the channels (24 -> 32 -> 56 -> 112 -> 128 -> 256) and
strides by 2 except in the 128 stage; the final layer maps 256 -> 432. Layers are numbered
1..21 in messages and docs, and 0..20 in code.
"""

from dataclasses import dataclass

STEM_CHS = 40
FIRST_BLOCK_CHS = 24
FEATURE_MIX_CHS = 1728
# (output channels, stride of the stage's first layer) of the stages with layers_per_stage layers.
STAGES: tuple[tuple[int, int], ...] = ((32, 2), (56, 2), (112, 2), (128, 1), (256, 2))
FINAL_LAYER_CHS = 432
FULL_LAYERS_PER_STAGE = 4
CHANNEL_DIVISOR = 8


@dataclass(frozen=True)
class ProxylessConfig:
    """Shape of a network in this space, with the same fields for the supernet and evaluation nets.

    The defaults are the full-size ImageNet network. ``width_mult`` scales every channel count
    (rounded to a multiple of 8), ``layers_per_stage`` below 4 gives shallower networks with
    5 * layers_per_stage + 1 searched layers, and ``stem_stride`` 1 suits small images such as
    the 8x8 digits.
    """

    num_classes: int = 1000
    in_chs: int = 3
    width_mult: float = 1.0
    layers_per_stage: int = FULL_LAYERS_PER_STAGE
    stem_stride: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not self.width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {self.width_mult}")
        if self.layers_per_stage < 1:
            raise ValueError(f"layers_per_stage must be at least 1, got {self.layers_per_stage}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one searched layer and whether it may choose skip.

    Skip follows the full-width layout, so a genotype stays valid at every width: layer 13
    (112 -> 128 channels) may not skip even where rounding gives both sides the same width.
    """

    in_chs: int
    out_chs: int
    stride: int
    skip_allowed: bool


def scale_chs(chs: int, width_mult: float) -> int:
    """Scale a channel count and round it to a multiple of 8, losing at most 10% to rounding."""
    scaled = chs * width_mult
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += CHANNEL_DIVISOR
    return rounded


def searched_layer_count(layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> int:
    return len(STAGES) * layers_per_stage + 1


def skip_allowed(index: int, layers_per_stage: int = FULL_LAYERS_PER_STAGE) -> bool:
    """Return whether searched layer ``index`` (0-based) keeps its shape in the full-width layout."""
    return index < len(STAGES) * layers_per_stage and index % layers_per_stage != 0


def layer_specs(config: ProxylessConfig) -> list[LayerSpec]:
    specs = []
    in_chs = scale_chs(FIRST_BLOCK_CHS, config.width_mult)
    for stage_chs, first_stride in STAGES:
        out_chs = scale_chs(stage_chs, config.width_mult)
        for position in range(config.layers_per_stage):
            stride = first_stride if position == 0 else 1
            specs.append(LayerSpec(in_chs, out_chs, stride, skip_allowed(len(specs), config.layers_per_stage)))
            in_chs = out_chs
    specs.append(LayerSpec(in_chs, scale_chs(FINAL_LAYER_CHS, config.width_mult), 1, skip_allowed=False))
    return specs
