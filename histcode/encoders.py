"""The encoder zoo: tile encoders by name, built without downloading anything.

Every encoder is an :class:`Encoder`: an ``nn.Module`` mapping normalised tiles
``(batch_size, 3, H, W)`` to embeddings ``(batch_size, embed_dim)``, exposing ``embed_dim`` and
``input_spec`` (:class:`~histcode.inputspec.InputSpec`: mpp, tile size, mean/std). Builders live
in one :class:`~histcode.builders.Builders` registry, :data:`encoders`:

============== ============================================================== ==========
name           architecture                                                   embed_dim
============== ============================================================== ==========
resnet18       torchvision ResNet-18, global average pool                     512
resnet34       torchvision ResNet-34, global average pool                     512
resnet50       torchvision ResNet-50, global average pool                     2048
resnet50_trunc torchvision ResNet-50 through layer3, global average pool      1024
               (as CLAM and the original HistCode use)
tiny           three strided convolutions, for tests and CPU demos            32 (any)
               (options ``depth``, ``final_relu``: a ReLU before the pool)
timm           any timm model (``model_name=…``), when timm is installed      the model's
============== ============================================================== ==========

``create_encoder("timm:vit_small_patch16_224")`` is short for
``create_encoder("timm", model_name="vit_small_patch16_224")``; timm is the optional extra
``pip install 'histcode[timm]'``.

Pretrained weights come only from local files (``weights="path.safetensors"`` or a
``.pth``/``.pt`` state dict, read with ``torch.load(weights_only=True)``): ImageNet or
foundation-model weights you downloaded yourself. Common wrapper prefixes (``module.``,
``backbone.``, …) are stripped and classifier heads dropped; anything else that does not fit is
reported. torchvision and timm are always built with random weights, so nothing is downloaded
at run time.

Every builder takes ``mpp``, ``tile_size``, ``mean`` and ``std`` (the input spec, ImageNet
normalisation at 0.5 µm/px by default), and records its full arguments on the module
(``architecture``, ``arguments``) so that :func:`encoder_card` can write a registry card that
rebuilds it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histcode.builders import Builders
from histcode.inputspec import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from histcode.lineage import Parent, as_parents
from histcode.registry import Card

#: The encoder zoo: name → builder. ``encoders.create(name, **kwargs)`` or :func:`create_encoder`.
encoders: Builders[Encoder] = Builders("encoder")

#: Key prefixes stripped from a weights file when the key does not fit as is.
WRAPPER_PREFIXES = (
    "module.",
    "_orig_mod.",
    "model.",
    "backbone.",
    "encoder.",
    "trunk.",
    "feature_extractor.",
    "student.",
    "teacher.",
)
#: Key prefixes of heads that an encoder does not have; dropped from a weights file.
HEAD_PREFIXES = ("fc.", "head.", "heads.", "head_dist.", "classifier.", "projection_head.")
#: Nested keys under which checkpoints commonly keep their state dict.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "teacher", "student", "net")
#: File suffixes read as safetensors, and as torch state dicts (``weights_only=True``).
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class Encoder(nn.Module):
    """Base of all encoders: normalised tiles ``(B, 3, H, W)`` → embeddings ``(B, embed_dim)``.

    Args:
        embed_dim: size ``D`` of the embeddings.
        input_spec: what the encoder expects of its input tiles.

    Attributes:
        embed_dim: size of the embeddings.
        input_spec: mpp, tile size and normalisation of the input tiles.
        architecture: zoo name it was built from (``""`` if not built by the zoo).
        arguments: the builder's JSON-able keyword arguments (without ``weights``).
        init_weights: ``{"path", "sha256"}`` of the local weights file it was initialised
            from, or ``None``.
    """

    #: Key prefixes of a weights file this encoder drops on purpose (e.g. a truncated ``layer4``).
    ignored_prefixes: tuple[str, ...] = ()

    def __init__(self, embed_dim: int, input_spec: InputSpec) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.input_spec = input_spec
        self.architecture = ""
        self.arguments: dict[str, Any] = {}
        self.init_weights: dict[str, str] | None = None

    def weights_target(self) -> nn.Module:
        """The module that a local weights file is loaded into (the encoder itself by default)."""
        return self

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, input_spec={self.input_spec}"


class ResNetEncoder(Encoder):
    """A torchvision ResNet without its classifier, pooled to one vector per tile.

    Parameter names match torchvision's ``ResNet`` (``conv1.weight``, ``layer1.0.…``), so
    torchvision ImageNet state dicts load as they are.

    Args:
        depth: 18, 34 or 50.
        num_stages: residual stages kept (4 = the full network; 3 stops after ``layer3``).
        input_spec: what the encoder expects of its input tiles.

    Shapes:
        ``(B, 3, H, W)`` → ``(B, embed_dim)``; embed_dim is 512 (ResNet-18/34), 2048
        (ResNet-50), or 256/1024 (ResNet-18/34, ResNet-50) after layer 3.
    """

    def __init__(self, depth: int, num_stages: int, input_spec: InputSpec) -> None:
        from torchvision.models import resnet

        constructors = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50}
        if depth not in constructors or num_stages not in (1, 2, 3, 4):
            raise ValueError(f"ResNet depth must be 18, 34 or 50 and num_stages 1-4, got {depth}")
        net = constructors[depth](weights=None)  # never downloads
        layers = [getattr(net, f"layer{i}") for i in range(1, num_stages + 1)]
        last = layers[-1][-1]
        width = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
        super().__init__(width, input_spec)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        for i, layer in enumerate(layers, start=1):
            self.add_module(f"layer{i}", layer)
        self.num_stages = num_stages
        self.ignored_prefixes = tuple(f"layer{i}." for i in range(num_stages + 1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed tiles.

        Args:
            x: normalised tiles, ``(batch_size, 3, H, W)``.

        Returns:
            Embeddings, ``(batch_size, embed_dim)``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class TinyEncoder(Encoder):
    """Strided 3×3 convolutions and a global average pool: fast on CPU, for tests and demos.

    With the defaults (three convolutions, no activation after the last) the pooled embedding
    is a linear map of the mean of the second layer's features over the tile: a texture
    average with a 15 px receptive field. ``final_relu`` rectifies the last convolution before
    the pool, so that a channel can count *where* a pattern occurs (e.g. the share of a tile's
    positions with a large, dark nucleus) instead of averaging it away; ``depth`` 4 adds a
    fourth convolution (31 px receptive field). Neither adds parameters' names that the
    three-layer weights lack: old weights files load into the default architecture unchanged.

    Args:
        embed_dim: size of the embeddings.
        width: channels of the first convolution (each further one doubles them; the last
            has ``embed_dim``).
        input_spec: what the encoder expects of its input tiles.
        depth: number of strided convolutions, ≥ 2.
        final_relu: a ReLU after the last convolution, before the pool.

    Shapes:
        ``(B, 3, H, W)`` → ``(B, embed_dim)``, any ``H, W`` ≥ 1.
    """

    def __init__(
        self,
        embed_dim: int,
        width: int,
        input_spec: InputSpec,
        depth: int = 3,
        final_relu: bool = False,
    ) -> None:
        if embed_dim < 1 or width < 1:
            raise ValueError(f"embed_dim and width must be positive, got {embed_dim}, {width}")
        if depth < 2:
            raise ValueError(f"depth must be at least 2 convolutions, got {depth}")
        super().__init__(embed_dim, input_spec)
        channels = [3] + [width * 2**i for i in range(depth - 1)] + [embed_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1))
            if i < depth - 1 or final_relu:
                layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed tiles.

        Args:
            x: normalised tiles, ``(batch_size, 3, H, W)``.

        Returns:
            Embeddings, ``(batch_size, embed_dim)``.
        """
        return self.features(x).mean(dim=(2, 3))


class TimmEncoder(Encoder):
    """A timm backbone without its classifier (``num_classes=0``), pooled by timm.

    Args:
        model: a timm model created with ``num_classes=0``.
        input_spec: what the encoder expects of its input tiles.

    Shapes:
        ``(B, 3, H, W)`` → ``(B, model.num_features)``.
    """

    def __init__(self, model: nn.Module, input_spec: InputSpec) -> None:
        super().__init__(int(model.num_features), input_spec)
        self.model = model

    def weights_target(self) -> nn.Module:
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed tiles.

        Args:
            x: normalised tiles, ``(batch_size, 3, H, W)``.

        Returns:
            Embeddings, ``(batch_size, embed_dim)``.
        """
        return self.model(x)


# -- local weight files -------------------------------------------------------------------------


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a local state dict: safetensors, or a torch file with ``weights_only=True``.

    A state dict nested under a common key (``state_dict``, ``model``, ``teacher``, …) is
    unwrapped; non-tensor entries are dropped.

    Args:
        path: a ``.safetensors`` file (preferred) or ``.pth``/``.pt``/``.bin``/``.ckpt``.

    Returns:
        ``(state_dict, sha256)``: CPU tensors by key, and the sha256 of the file's bytes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, unreadable file, or no tensors in it.
    """
    from safetensors.torch import load as load_safetensors

    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ValueError(
            f"weights file {path}: unknown suffix {suffix!r}; use a .safetensors file "
            f"(preferred) or a torch state dict ({', '.join(TORCH_SUFFIXES)})"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass the path of a local weights file "
            "(histcode never downloads weights)"
        )
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            obj: Any = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"weights file {path} holds pickled Python objects besides tensors, which are not "
            f"loaded for safety ({str(err).splitlines()[0]}). Save only the state dict "
            "(torch.save(model.state_dict(), …)) or convert it to .safetensors."
        ) from None
    except Exception as err:  # safetensors and torch raise many error types for bad files
        raise ValueError(
            f"weights file {path} cannot be read as {suffix[1:]} ({err}); check that the file "
            "is complete and has the right suffix"
        ) from None
    for _ in range(3):  # unwrap {"state_dict": {...}} and similar, a few levels deep
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    tensors = (
        {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping)
        else {}
    )
    if not tensors:
        found = type(obj).__name__
        if isinstance(obj, Mapping):
            found += f" with keys {', '.join(map(str, list(obj)[:8]))}"
        raise ValueError(
            f"weights file {path} holds no tensors (found {found}); pass a file holding a "
            "state dict (parameter name → tensor)"
        )
    return tensors, sha256


def _fit_keys(
    state: Mapping[str, torch.Tensor], expected: Iterable[str], ignored: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from keys that do not fit and drop heads and ignored keys."""
    expected = set(expected)
    out = {}
    for key, value in state.items():
        while key not in expected and key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key not in expected and key.startswith((*HEAD_PREFIXES, *ignored)):
            continue
        out[key] = value
    return out


def _listing(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', …' if len(keys) > limit else ''})"


def load_weights(encoder: Encoder, path: str | Path) -> None:
    """Load a local weights file into ``encoder`` (its :meth:`Encoder.weights_target`).

    Keys are matched after stripping wrapper prefixes (``module.``, ``backbone.``, …) and
    dropping classifier/projection heads; every parameter and buffer must then be present
    with the right shape (BatchNorm's ``num_batches_tracked`` may be absent).

    Args:
        encoder: the encoder to initialise.
        path: a ``.safetensors`` (preferred) or ``.pth``/``.pt`` state dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or keys/shapes that do not fit; the message lists them.
    """
    state, sha256 = read_weights_file(path)
    target = encoder.weights_target()
    own = target.state_dict()
    state = _fit_keys(state, own, encoder.ignored_prefixes)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = sorted(k for k in state if k not in own)
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if wrong:
            problems.append(f"wrong shapes (file vs model): {_listing(wrong)}")
        what = encoder.architecture or type(encoder).__name__
        raise ValueError(
            f"weights file {path} does not fit encoder {what!r} — {'; '.join(problems)}. "
            "Check that the file is for this architecture; wrapper prefixes"
            f" {', '.join(WRAPPER_PREFIXES)} are stripped and heads "
            f"{', '.join(HEAD_PREFIXES)} dropped automatically."
        )
    target.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    encoder.init_weights = {"path": str(Path(path).expanduser().resolve()), "sha256": sha256}


# -- the zoo ------------------------------------------------------------------------------------


def _jsonable(arguments: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(arguments))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"arguments of encoder {name!r} must be JSON-able to be stored in a registry card "
            f"({err}); got {arguments!r}"
        ) from None


def _register(name: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Register a builder in :data:`encoders`, wrapped to record its arguments and load weights.

    The builder takes keyword arguments only; the wrapper adds ``weights`` (a local file) and
    is what the module-level name refers to, so ``resnet50(weights=…)`` works too.
    """

    def decorate(builder: Callable[..., Encoder]) -> Callable[..., Encoder]:
        signature = inspect.signature(builder)

        @functools.wraps(builder)
        def build(weights: str | None = None, **kwargs: Any) -> Encoder:
            try:
                bound = signature.bind(**kwargs)
            except TypeError as err:
                params = ", ".join(["weights", *signature.parameters])
                raise ValueError(f"encoder {name!r}: {err}; it takes {params}") from None
            bound.apply_defaults()
            encoder = builder(**bound.arguments)
            arguments = dict(bound.arguments)
            spec = encoder.input_spec.to_dict()  # record resolved defaults (e.g. timm's)
            arguments.update({k: v for k, v in spec.items() if k in arguments})
            encoder.architecture = name
            encoder.arguments = _jsonable(arguments, name)
            if weights is not None:
                load_weights(encoder, weights)
            return encoder

        weights_param = inspect.Parameter(
            "weights", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None"
        )
        build.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[weights_param, *signature.parameters.values()]
        )
        return encoders.register(name)(build)

    return decorate


def _spec(mpp: float, tile_size: int, mean: Sequence[float], std: Sequence[float]) -> InputSpec:
    return InputSpec(mpp=mpp, tile_size=tile_size, mean=tuple(mean), std=tuple(std))  # type: ignore[arg-type]


@_register("resnet18")
def resnet18(
    *,
    mpp: float = 0.5,
    tile_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """torchvision ResNet-18 with global average pooling, 512-d."""
    return ResNetEncoder(18, 4, _spec(mpp, tile_size, mean, std))


@_register("resnet34")
def resnet34(
    *,
    mpp: float = 0.5,
    tile_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """torchvision ResNet-34 with global average pooling, 512-d."""
    return ResNetEncoder(34, 4, _spec(mpp, tile_size, mean, std))


@_register("resnet50")
def resnet50(
    *,
    mpp: float = 0.5,
    tile_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """torchvision ResNet-50 with global average pooling, 2048-d."""
    return ResNetEncoder(50, 4, _spec(mpp, tile_size, mean, std))


@_register("resnet50_trunc")
def resnet50_trunc(
    *,
    mpp: float = 0.5,
    tile_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """torchvision ResNet-50 through layer 3 with global average pooling, 1024-d.

    The tile encoder of CLAM (Lu et al., Nat. Biomed. Eng. 2021) and the original HistCode;
    full ResNet-50 weights files load into it (``layer4`` and ``fc`` are dropped).
    """
    return ResNetEncoder(50, 3, _spec(mpp, tile_size, mean, std))


@_register("tiny")
def tiny(
    *,
    embed_dim: int = 32,
    width: int = 16,
    depth: int = 3,
    final_relu: bool = False,
    mpp: float = 0.5,
    tile_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Encoder:
    """Strided convolutions (``depth``, 3 by default), ``embed_dim``-d (32 by default): for
    tests and CPU demos; ``final_relu`` rectifies the last one (:class:`TinyEncoder`)."""
    return TinyEncoder(embed_dim, width, _spec(mpp, tile_size, mean, std), depth, final_relu)


@_register("timm")
def timm_encoder(
    *,
    model_name: str,
    model_kwargs: dict[str, Any] | None = None,
    mpp: float = 0.5,
    tile_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Encoder:
    """Any timm model as an encoder (``num_classes=0``), with random weights.

    Args:
        model_name: timm model name (e.g. ``"vit_small_patch16_224"``).
        model_kwargs: extra keyword arguments of ``timm.create_model`` (e.g.
            ``{"init_values": 1e-5, "dynamic_img_size": true}`` for UNI-style ViTs).
        mpp: µm/px the encoder expects.
        tile_size: tile side; default the model's pretrained config input size.
        mean: normalisation mean; default the model's pretrained config.
        std: normalisation std; default the model's pretrained config.

    Raises:
        ImportError: timm is not installed.
    """
    try:
        import timm
    except ImportError:
        raise ImportError(
            f"encoder 'timm' ({model_name!r}) needs timm, which is not installed; install "
            "the optional extra: pip install 'histcode[timm]'"
        ) from None
    try:
        model = timm.create_model(
            model_name, pretrained=False, num_classes=0, **(model_kwargs or {})
        )
    except RuntimeError as err:  # timm: "Unknown model (…)"
        raise ValueError(
            f"timm cannot build {model_name!r} ({err}); see timm.list_models('*pattern*') for "
            "model names"
        ) from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    spec = _spec(
        mpp,
        tile_size if tile_size is not None else int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean if mean is not None else cfg.get("mean", IMAGENET_MEAN),
        std if std is not None else cfg.get("std", IMAGENET_STD),
    )
    return TimmEncoder(model, spec)


def create_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build an encoder of the zoo by name.

    Args:
        name: a name in :data:`encoders` (``resnet50_trunc``, ``tiny``, …) or
            ``"timm:<model_name>"``.
        **kwargs: the builder's arguments, e.g. ``weights="imagenet_r50.safetensors"``,
            ``mpp=0.25``, ``tile_size=256``.

    Returns:
        The encoder, in training mode.

    Raises:
        histcode.builders.UnknownNameError: unknown name; lists names and close matches.
        ValueError: unknown argument, or a weights file that does not fit.
    """
    if name.startswith("timm:"):
        return encoders.create("timm", model_name=name.removeprefix("timm:"), **kwargs)
    return encoders.create(name, **kwargs)


def encoder_card(
    encoder: Encoder,
    *,
    metrics: Mapping[str, Any] | None = None,
    parents: Sequence[Parent | str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Card:
    """A registry card for an encoder built by the zoo (architecture, arguments, input spec).

    The local weights file it was initialised from, if any, is added to its lineage as
    ``Parent("file", path, sha256)``.

    Args:
        encoder: an encoder made by :func:`create_encoder` or :data:`encoders`.
        metrics: metrics of the run that trained it.
        parents: what it was trained from (:class:`~histcode.lineage.Parent`; strings of the
            old form are read as :func:`~histcode.lineage.parse_parent` reads them).
        extra: anything else (JSON-able).

    Raises:
        ValueError: the encoder was not built by the zoo.
    """
    if not getattr(encoder, "architecture", ""):
        raise ValueError(
            f"{type(encoder).__name__} was not built by the encoder zoo, so its card cannot name "
            "a builder; build it with histcode.encoders.create_encoder(...) or write the Card "
            "yourself (architecture = a registered builder name, arguments = its kwargs)"
        )
    lineage = as_parents(parents)
    if encoder.init_weights:
        init = encoder.init_weights
        lineage.append(Parent("file", str(init["path"]), str(init["sha256"])))
    return Card(
        kind="encoder",
        architecture=encoder.architecture,
        arguments=dict(encoder.arguments),
        input_spec=encoder.input_spec,
        metrics=dict(metrics or {}),
        lineage=lineage,
        extra=dict(extra or {}),
    )


__all__ = [
    "Encoder",
    "InputSpec",
    "ResNetEncoder",
    "TimmEncoder",
    "TinyEncoder",
    "create_encoder",
    "encoder_card",
    "encoders",
    "load_weights",
    "read_weights_file",
]
