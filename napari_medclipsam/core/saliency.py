"""Text-conditioned saliency on a CLIP vision tower: M2IB (multi-modal information bottleneck).

The bottleneck (Wang et al. 2024, as used by MedCLIP-SAMv2) sits after ViT block
``layer`` of ``model.visual.trunk``. For the block's output ``z`` ([1, N, C], token 0
the CLS token) and mask logits ``alpha`` ([1, N, C], initialised to ``init_alpha``)::

    lambda = sigmoid(alpha)
    z'     = lambda * z + (1 - lambda) * eps,        eps ~ N(0, 1)
    capacity = -0.5 * (1 + log((1 - lambda)^2) - (lambda * z)^2 - (1 - lambda)^2)
    loss   = beta * mean(capacity) - mean_b cos(text_embedding, image_embedding(z'_b))

``alpha`` is trained with Adam for ``steps`` steps on a batch of ``batch_size`` noise
samples. The saliency is the capacity summed over channels, prefix (CLS) tokens dropped,
reshaped to the patch grid, bilinearly upsampled to the model's input size, min-max
normalised to [0, 1] and resized to the image.

Which capacity (``SaliencyConfig.readout``): ``"last_forward"`` (default) reads the
capacity computed in the last step's forward pass, before that step's Adam update, as the
authors' MedCLIP-SAMv2 code and IBA read their bottleneck's stored capacity; ``"final"``
reads it from ``alpha`` after all ``steps`` updates. With the same seed, the
``"last_forward"`` map of ``k`` steps is the ``"final"`` map of ``k - 1`` steps.

Two implementations give the same map for the same seed (the noise is drawn from one
seeded generator in the same order):

* :func:`m2ib_saliency` (used everywhere): the blocks before the bottleneck and the text
  embedding are computed once, gradients flow only to ``alpha`` (no parameter gradients),
  and each step runs only the blocks after the bottleneck.
* :func:`m2ib_saliency_reference`: the straightforward way of the research code (a hook
  on the block stores the capacity of every forward pass; the whole model, text tower
  included, runs every step with parameter gradients enabled). Kept for tests and
  benchmarks. Both give either readout.

Choices, documented: ``log((1-lambda)^2)`` is computed as ``2*logsigmoid(-alpha)`` (the
same value, finite for any alpha); images are resized to the square input without
cropping, so the map covers the whole image; the map is resized to the image bilinearly
as a float (the research code: nearest neighbour, saved as an 8-bit PNG); a prompt
ensemble averages the L2-normalised text embeddings (the paper's P4/P5; the research
code averages raw features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .config import SaliencyConfig
from .errors import CancelledError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models import ClipBundle

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


# --------------------------------------------------------------------------- inputs


def prepare_image(clip: ClipBundle, image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> [1, 3, S, S] float tensor on the model's device.

    The whole image is resized (bilinear, antialiased) to the model's square input
    ``S`` without cropping, scaled to [0, 1] and normalised with the model's mean/std.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(
            f"Expected an HxWx3 uint8 RGB image; got shape {image.shape}, dtype {image.dtype}. "
            "Use napari_medclipsam.core.io.to_rgb_uint8 to convert.")
    return image_tensor(image, clip.image_size, clip.mean, clip.std)[None].to(clip.device)


def image_tensor(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """HxWx3 uint8 -> [3, size, size] float on the CPU: the whole image resized (bilinear,
    antialiased) without cropping, scaled to [0, 1], normalised with ``mean``/``std``. The
    one preprocessing of CLIP inputs, for the saliency and for fine-tuning."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t)[0]


def as_prompts(text: str | Sequence[str]) -> list[str]:
    """One prompt or a prompt ensemble as a list of non-empty, stripped prompts.

    Raises
    ------
    InputError
        If no prompt is left (an empty text).
    """
    prompts = [text] if isinstance(text, str) else list(text)
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise InputError("The text prompt is empty: type what to find, e.g. 'breast tumor'.")
    return prompts


def encode_text(clip: ClipBundle, text: str | Sequence[str],
                allow_empty: bool = False) -> torch.Tensor:
    """Text embedding [1, D] of one prompt, or the mean of the L2-normalised embeddings of
    an ensemble of prompts (the paper's P4/P5 prompt ensembles). ``allow_empty``: a blank
    text is the empty prompt (the faithfulness check's neutral prompt may be empty) instead
    of an error."""
    import torch

    items = [text] if isinstance(text, str) else list(text)
    blank = not any(isinstance(t, str) and t.strip() for t in items)
    prompts = [""] if allow_empty and blank else as_prompts(text)
    with torch.no_grad():
        tokens = clip.tokenizer(prompts).to(clip.device)
        features = clip.model.encode_text(tokens).float()
        features = features / features.norm(dim=-1, keepdim=True)
    return features.mean(dim=0, keepdim=True)


# --------------------------------------------------------------------------- ViT split


def vit_parts(clip: ClipBundle):
    visual = clip.model.visual
    trunk = getattr(visual, "trunk", None)
    blocks = getattr(trunk, "blocks", None)
    if trunk is None or blocks is None or not hasattr(trunk, "patch_embed"):
        raise InputError(
            "M2IB needs a CLIP whose vision tower is a timm ViT (model.visual.trunk.blocks), "
            "as BiomedCLIP's is.")
    return visual, trunk, blocks


def _check_layer(layer: int, depth: int) -> None:
    if not 0 <= layer < depth:
        raise InputError(f"layer must be between 0 and {depth - 1} for this model "
                         f"({depth} ViT blocks); got {layer}.")


def vit_prefix(clip: ClipBundle, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Tokens after ViT block ``layer`` (0-based): [B, N, C]."""
    _, trunk, blocks = vit_parts(clip)
    x = trunk.patch_embed(x)
    x = trunk._pos_embed(x)
    x = trunk.patch_drop(x)
    x = trunk.norm_pre(x)
    for block in blocks[: layer + 1]:
        x = block(x)
    return x


def vit_suffix(clip: ClipBundle, z: torch.Tensor, layer: int) -> torch.Tensor:
    """Image embedding [B, D] from the tokens after block ``layer``.

    When the embedding is read from the class token alone (timm's ``global_pool="token"``),
    the last block computes only what that token needs (:func:`_class_token_block`): the
    same embedding for a fraction of the last block's work.
    """
    visual, trunk, blocks = vit_parts(clip)
    suffix = list(blocks[layer + 1:])
    for block in suffix[:-1]:
        z = block(z)
    if suffix:
        last = suffix[-1]
        z = _class_token_block(last, z) if _reads_class_token(trunk, last) else last(z)
    z = trunk.norm(z)
    z = trunk.forward_head(z)
    return visual.head(z)


def _reads_class_token(trunk, block) -> bool:
    """Whether the trunk's output is its class token alone and ``block`` is timm's plain
    ViT block (so :func:`_class_token_block` computes exactly what it does)."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    return (type(block) is Block and type(block.attn) is Attention
            and getattr(trunk, "attn_pool", None) is None
            and getattr(trunk, "global_pool", None) == "token"
            and int(getattr(trunk, "num_prefix_tokens", 0)) >= 1)


def _class_token_block(block, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block`` on tokens x [B, N, C] (eval mode), returning only the class token's
    output [B, 1, C]: keys and values of every token, the query, attention output and MLP
    for the class token alone (about a sixth of the block's multiply-adds)."""
    import torch.nn.functional as F

    attn = block.attn
    b, n, c = x.shape
    y = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias  # rows: q, k, v, each C
    q = F.linear(y[:, :1], weight[:c], None if bias is None else bias[:c])
    kv = F.linear(y, weight[c:], None if bias is None else bias[c:])
    q = q.reshape(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(b, 1, c))))
    cls = x[:, :1] + block.drop_path1(block.ls1(out))
    return cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))


def patch_grid(trunk) -> tuple[int, int]:
    grid = getattr(trunk.patch_embed, "grid_size", None)
    if grid is None:
        raise InputError("Cannot tell the ViT's patch grid (patch_embed.grid_size).")
    return int(grid[0]), int(grid[1])


# --------------------------------------------------------------------------- bottleneck maths


def _capacity(z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per-element KL of the bottleneck's output distribution to N(0, 1)."""
    import torch
    import torch.nn.functional as F

    lam = torch.sigmoid(alpha)
    log_var = 2.0 * F.logsigmoid(-alpha)  # log((1 - lambda)^2), finite for any alpha
    return -0.5 * (1.0 + log_var - (lam * z) ** 2 - (1.0 - lam) ** 2)


def _bottleneck(z: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    import torch

    lam = torch.sigmoid(alpha)
    return lam * z + (1.0 - lam) * eps


def _saliency_map(clip: ClipBundle, capacity: torch.Tensor, out_shape: tuple[int, int]
                  ) -> np.ndarray:
    """capacity [1, N, C] -> HxW float32 in [0, 1]."""
    import torch

    _, trunk, _ = vit_parts(clip)
    prefix = int(getattr(trunk, "num_prefix_tokens", 1))
    with torch.no_grad():
        per_token = torch.nansum(capacity[0].float(), dim=-1)[prefix:]
        return grid_to_map(clip, per_token.reshape(patch_grid(trunk)), out_shape)


def grid_to_map(clip: ClipBundle, grid: torch.Tensor, out_shape: tuple[int, int]
                ) -> np.ndarray:
    """A (gh, gw) map on the patch grid -> HxW float32 in [0, 1]: bilinear to the model's
    input size, min-max normalised there (all zeros if flat), then resized to ``out_shape``.
    Every saliency method ends here."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        size = clip.image_size
        up = F.interpolate(grid.float()[None, None], size=(size, size), mode="bilinear",
                           align_corners=False)
        up = up - up.min()
        peak = up.max()
        up = up / peak if peak > 0 else torch.zeros_like(up)
        if tuple(out_shape) != (size, size):
            up = F.interpolate(up, size=tuple(out_shape), mode="bilinear", align_corners=False)
        return up[0, 0].clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)


def _noise_generator(device: str, seed: int):
    import torch

    gen_device = "cpu" if str(device).startswith("mps") else device
    return torch.Generator(device=gen_device).manual_seed(int(seed)), gen_device


def _draw(gen, gen_device: str, shape, device) -> torch.Tensor:
    import torch

    return torch.randn(shape, generator=gen, device=gen_device).to(device)


# --------------------------------------------------------------------------- fast path


def m2ib_saliency(
    clip: ClipBundle,
    image: np.ndarray,
    text: str | Sequence[str],
    config: SaliencyConfig | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    text_embedding: torch.Tensor | None = None,
) -> np.ndarray:
    """M2IB saliency of ``text`` on ``image``.

    Parameters
    ----------
    clip : ClipBundle
        From :func:`napari_medclipsam.core.models.load_clip`.
    image : np.ndarray
        HxWx3 uint8 RGB.
    text : str or sequence of str
        One prompt, or several (their normalised embeddings are averaged).
    config : SaliencyConfig
        layer, beta, steps, lr, batch_size, seed, init_alpha, readout.
    progress : callable, optional
        Called as ``progress(step, steps)`` after every optimisation step.
    should_stop : callable, optional
        Checked before every step; when it returns True, :class:`CancelledError` is raised.
    text_embedding : torch.Tensor, optional
        A precomputed [1, D] embedding (from :func:`encode_text`) to reuse across images.

    Returns
    -------
    np.ndarray
        HxW float32 in [0, 1], at the input image's size.
    """
    cfg = config or SaliencyConfig()
    t = text_embedding if text_embedding is not None else encode_text(clip, text)
    return m2ib_saliencies(clip, image, [(t, cfg)], progress, should_stop)[0]


def m2ib_saliencies(
    clip: ClipBundle,
    image: np.ndarray,
    requests: Sequence[tuple[torch.Tensor, SaliencyConfig]],
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> list[np.ndarray]:
    """M2IB saliency maps of one image for several (text embedding, config) requests.

    The ViT's blocks up to each requested layer run once per layer, not once per request:
    a map for another text (a neutral or contrast prompt) or another beta costs only its
    own optimisation of the blocks after the bottleneck. Each request draws its noise from
    its own config's seed, so a request's map is the one :func:`m2ib_saliency` gives.

    Parameters
    ----------
    requests : sequence of (torch.Tensor, SaliencyConfig)
        ``[1, D]`` text embeddings (:func:`encode_text`) and their configs.
    progress : callable, optional
        ``progress(step, total)`` over all requests' optimisation steps.

    Returns
    -------
    list of np.ndarray
        HxW float32 maps in [0, 1], in the order of ``requests``.
    """
    import torch

    _, _, blocks = vit_parts(clip)
    for _, cfg in requests:
        _check_layer(cfg.layer, len(blocks))
    x = prepare_image(clip, image)
    total = sum(cfg.steps for _, cfg in requests)
    prefixes: dict[int, torch.Tensor] = {}
    maps: list[np.ndarray] = []
    done = 0
    for t, cfg in requests:
        if cfg.layer not in prefixes:
            with torch.no_grad():
                prefixes[cfg.layer] = vit_prefix(clip, x, cfg.layer).float()
        z = prefixes[cfg.layer]
        t = t.to(z.device).float()
        gen, gen_device = _noise_generator(clip.device, cfg.seed)
        step_progress = None
        if progress is not None:
            def step_progress(step: int, steps: int, offset: int = done) -> None:
                progress(offset + step, total)
        with _explicit_attention(blocks[cfg.layer + 1:], clip.device):
            last_forward = _optimise(clip, z, t, cfg, gen, gen_device, step_progress,
                                     should_stop)
        maps.append(_saliency_map(clip, last_forward, image.shape[:2]))
        done += cfg.steps
    return maps


@contextlib.contextmanager
def _explicit_attention(blocks, device: str):
    """On a CPU, timm's attention as explicit matrix products instead of SDPA's flash kernel
    in ``blocks`` (the same maths): under bf16 autocast the flash kernel's CPU backward is
    slow, and the explicit form takes M2IB at layer 9 from 2.0 to 1.6 s on two cores (fp32:
    no difference; ``benchmarks/RESULTS.md``). Other attention modules are left alone."""
    attns = [block.attn for block in blocks
             if isinstance(getattr(getattr(block, "attn", None), "fused_attn", None), bool)]
    if not str(device).startswith("cpu") or not attns:
        yield
        return
    saved = [attn.fused_attn for attn in attns]
    for attn in attns:
        attn.fused_attn = False
    try:
        yield
    finally:
        for attn, flag in zip(attns, saved, strict=True):
            attn.fused_attn = flag


def _optimise(clip, z, t, cfg, gen, gen_device, progress, should_stop):
    """M2IB's Adam loop on the bottleneck's logits; the capacity the readout asks for."""
    import torch

    alpha = torch.full_like(z, float(cfg.init_alpha), requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=cfg.lr)
    batch_shape = (cfg.batch_size, *z.shape[1:])
    last_forward = None
    # With the default readout the map is the last pass's capacity, taken before that
    # pass's update: the last step's suffix pass and update change nothing that is read,
    # so they are skipped (the same map as running them; tested against the reference).
    updates = cfg.steps - 1 if cfg.readout == "last_forward" else cfg.steps
    with torch.enable_grad():
        for step in range(cfg.steps):
            if should_stop is not None and should_stop():
                raise CancelledError("Saliency cancelled.")
            if step == updates:
                with torch.no_grad():
                    last_forward = _capacity(z, alpha)
                if progress is not None:
                    progress(step + 1, cfg.steps)
                break
            eps = _draw(gen, gen_device, batch_shape, z.device)
            optimizer.zero_grad(set_to_none=True)
            z_noisy = _bottleneck(z, alpha, eps)
            image_features = vit_suffix(clip, z_noisy, cfg.layer)
            fit = torch.nn.functional.cosine_similarity(image_features, t, dim=-1).mean()
            capacity = _capacity(z, alpha)
            loss = cfg.beta * capacity.mean() - fit
            loss.backward()
            last_forward = capacity.detach()  # this pass's capacity, before the update
            optimizer.step()
            if progress is not None:
                progress(step + 1, cfg.steps)
    if cfg.readout == "final":
        with torch.no_grad():
            last_forward = _capacity(z, alpha)
    return last_forward


# --------------------------------------------------------------------------- reference


def m2ib_saliency_reference(
    clip: ClipBundle,
    image: np.ndarray,
    text: str | Sequence[str],
    config: SaliencyConfig | None = None,
) -> np.ndarray:
    """The straightforward M2IB, as the research code runs it; same output as
    :func:`m2ib_saliency` for the same seed and readout. For tests and benchmarks only.

    A forward hook replaces block ``layer``'s output by the bottleneck's and stores the
    capacity of that forward pass; every step runs the full image and text towers on the
    repeated batch with parameter gradients on. ``readout="last_forward"`` returns the
    stored capacity of the last pass averaged over the batch (what the research code
    returns); ``"final"`` recomputes it from ``alpha`` after the last update.
    """
    import torch

    cfg = config or SaliencyConfig()
    model = clip.model
    _, trunk, blocks = vit_parts(clip)
    _check_layer(cfg.layer, len(blocks))
    prompts = as_prompts(text)
    x = prepare_image(clip, image).expand(cfg.batch_size, -1, -1, -1)
    with torch.no_grad():
        z_shape = vit_prefix(clip, x[:1], cfg.layer).shape
    gen, gen_device = _noise_generator(clip.device, cfg.seed)
    alpha = torch.full(z_shape, float(cfg.init_alpha), device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=cfg.lr)
    state: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        eps = _draw(gen, gen_device, output.shape, output.device)
        state["capacity"] = _capacity(output, alpha)
        return _bottleneck(output, alpha, eps)

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    handle = blocks[cfg.layer].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            for _ in range(cfg.steps):
                optimizer.zero_grad(set_to_none=True)
                tokens = clip.tokenizer(prompts).to(x.device)
                t = model.encode_text(tokens).float()
                t = (t / t.norm(dim=-1, keepdim=True)).mean(dim=0, keepdim=True)
                image_features = model.encode_image(x)
                fit = torch.nn.functional.cosine_similarity(image_features, t, dim=-1).mean()
                loss = cfg.beta * state["capacity"].mean() - fit
                loss.backward()
                optimizer.step()
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    with torch.no_grad():
        if cfg.readout == "final":
            z = vit_prefix(clip, x[:1], cfg.layer)
            capacity = _capacity(z, alpha)
        else:
            capacity = state["capacity"].detach().mean(dim=0, keepdim=True)
    return _saliency_map(clip, capacity, image.shape[:2])
