"""The supernet and the evaluation network of the ProxylessNAS space.

Both share the fixed parts of the MobileNetV2 backbone: stem conv, first MBConv block, 1x1
feature-mix conv, global pooling and classifier. The supernet mixes all op choices of every
searched layer by architecture weights. The evaluation network is built from a genotype alone.
"""

import torch
from torch import nn

from search_spaces.proxyless.backbone import (
    FEATURE_MIX_CHS,
    FIRST_BLOCK_CHS,
    STEM_CHS,
    LayerSpec,
    ProxylessConfig,
    layer_specs,
    scale_chs,
)
from search_spaces.proxyless.genotype import Genotype, validate_genotype
from search_spaces.proxyless.ops import MBCONV_OPS, SEARCH_OPS, SKIP, MBConv, conv_bn, create_op


class _Backbone(nn.Module):
    """Fixed parts around the searched layers; subclasses fill ``self.layers``."""

    def __init__(self, config: ProxylessConfig):
        super().__init__()
        self.config = config
        self.specs = layer_specs(config)
        stem_chs = scale_chs(STEM_CHS, config.width_mult)
        first_chs = scale_chs(FIRST_BLOCK_CHS, config.width_mult)
        self.stem = conv_bn(config.in_chs, stem_chs, 3, config.stem_stride, 1, activation=True)
        self.first_block = MBConv(stem_chs, first_chs, kernel_size=3, expansion=1, stride=1)
        last_chs = self.specs[-1].out_chs
        mix_chs = scale_chs(FEATURE_MIX_CHS, config.width_mult)
        self.feature_mix = conv_bn(last_chs, mix_chs, 1, 1, 1, activation=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(mix_chs, config.num_classes)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.global_pool(self.feature_mix(features)).flatten(1)
        return self.classifier(self.dropout(pooled))


class MixedLayer(nn.Module):
    """All op choices of one searched layer, mixed by per-example or per-minibatch weights."""

    def __init__(self, spec: LayerSpec, skip_drop_prob: float):
        super().__init__()
        self.op_names = SEARCH_OPS if spec.skip_allowed else MBCONV_OPS
        self.ops = nn.ModuleList(create_op(name, spec.in_chs, spec.out_chs, spec.stride) for name in self.op_names)
        self.skip_drop_prob = skip_drop_prob

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # weights: (B or 1, choices). Choices whose weight is zero for the whole batch are not
        # run, so a one-hot sample costs one op per layer.
        active = (weights != 0).any(dim=0).tolist()
        out = None
        for k, op in enumerate(self.ops):
            if not active[k]:
                continue
            value = op(x)
            if self.op_names[k] == SKIP:
                value = self._drop_skip(value)
            term = weights[:, k].view(-1, 1, 1, 1) * value
            out = term if out is None else out + term
        if out is None:
            raise ValueError("a searched layer received all-zero architecture weights")
        return out

    def _drop_skip(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the skip path of whole examples with probability skip_drop_prob, in training mode only.

        Kept examples are scaled by 1 / (1 - skip_drop_prob), so the expected output is unchanged.
        """
        if not self.training or self.skip_drop_prob <= 0:
            return x
        keep_prob = 1.0 - self.skip_drop_prob
        mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep_prob)
        return x * mask / keep_prob


class SearchNetwork(_Backbone):
    """The weight-sharing supernet over every searched layer's op choices."""

    def __init__(self, config: ProxylessConfig, skip_drop_prob: float = 0.0):
        super().__init__(config)
        self.layers = nn.ModuleList(MixedLayer(spec, skip_drop_prob) for spec in self.specs)

    def forward(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """weights[l]: (B or 1, choices of layer l), one-hot or relaxed architecture weights."""
        if len(weights) != len(self.layers):
            raise ValueError(f"expected architecture weights for {len(self.layers)} layers, got {len(weights)}")
        x = self.first_block(self.stem(x))
        for layer, layer_weights in zip(self.layers, weights):
            x = layer(x, layer_weights)
        return self.forward_head(x)


class EvalNetwork(_Backbone):
    """A discrete network with one op per searched layer; a skipped layer is a parameter-free identity."""

    def __init__(self, genotype: Genotype, config: ProxylessConfig):
        super().__init__(config)
        self.genotype = validate_genotype(genotype, config.layers_per_stage)
        self.layers = nn.Sequential(*(
            create_op(op, spec.in_chs, spec.out_chs, spec.stride)
            for op, spec in zip(genotype.layers, self.specs)
        ))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.first_block(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
