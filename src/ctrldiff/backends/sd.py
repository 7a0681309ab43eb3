"""Stable Diffusion as a Backend: CTRL in the latent space of a local diffusers pipeline folder (the paper's
own setting: SD v1.5, c = a text prompt).

The only module that imports diffusers / transformers, and only inside functions, so `import ctrldiff` never
needs them. The chain's state (x_t, the step maths, the path KL) stays where the sampler puts it (the CPU,
drawn from a CPU generator: reproducible on any card); the networks run on `backend.device`, and `call` /
`decode` move latents there and back (4x64x64 floats per image each way, small beside a UNet pass). That keeps
`rl.finetune`, `sampling.sample`, the baselines and evaluation unchanged.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..contracts import Cond
from ..io import CtrlDiffError
from ..schedule import Schedule
from .pixels import asset_path

# LoRA on the attention projections of every transformer block (the official configuration)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_prompts(path: str | Path | None = None) -> list[str]:
    """The c distribution: one prompt per line of a text file (default: the 45 animal names shipped, as in
    the paper's training prompts); blank lines are skipped."""
    path = Path(path) if path is not None else asset_path("animals.txt")
    if not path.is_file():
        raise CtrlDiffError(f"missing prompt file {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CtrlDiffError(f"prompt file {path} has no prompts (one per line)")
    return prompts


@contextmanager
def added_to_time_embedding(net: nn.Module, emb: Tensor | None):
    """Add `emb` (B, emb_dim) to the output of `net.time_embedding` for the calls inside the block.

    A forward hook rather than the UNet's own extra inputs: `class_labels` needs `class_embed_type` set when
    the model is built and `timestep_cond` needs `time_cond_proj_dim`; SD v1.5 has neither, and adding them
    would change the pre-trained module tree. The hook adds the control exactly where the paper does (the
    timestep embedding that every ResBlock reads) through a public PyTorch mechanism, without editing the
    model; it is registered per call, so a checkpointed recomputation re-registers it."""
    if emb is None:
        yield
        return

    def add(module, args, out):
        return out + emb.to(out.device, out.dtype)

    handle = net.time_embedding.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


@dataclass(eq=False)
class SDBackend:
    """A Backend on a diffusers UNet2DConditionModel: eps-prediction in latent space with text CFG.

    Cond.c holds prompt indices into `prompts`; c = len(prompts) (num_c) is the empty prompt (the null c).
    """

    net: nn.Module  # UNet2DConditionModel, frozen
    vae: nn.Module  # AutoencoderKL, frozen
    text_encoder: nn.Module  # CLIPTextModel, frozen
    tokenizer: object
    schedule: Schedule
    prompts: list[str]
    guidance: float = 7.5  # text CFG scale (official 7.5); 1 = no CFG
    latent_size: int = 64
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    share_weights: bool = True  # ControlledDenoiser shares the frozen tensors instead of copying 860M params
    decode_batch: int = 8  # images per VAE decoder call
    _text: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        for m in (self.net, self.vae, self.text_encoder):
            m.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.net.config.in_channels, self.latent_size, self.latent_size)

    @property
    def emb_dim(self) -> int:
        return self.net.time_embedding.linear_2.out_features

    @property
    def num_c(self) -> int:
        return len(self.prompts)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent (8 for SD): 2 ** (number of VAE down-sampling levels)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.latent_size * self.vae_scale

    def to(self, device) -> SDBackend:
        for m in (self.net, self.vae, self.text_encoder):
            m.to(device)
        self._text = None
        return self

    @torch.no_grad()
    def prompt_embeddings(self) -> Tensor:
        """(num_c + 1, L, D) text-encoder states of every prompt, then of the empty prompt (row num_c).
        Encoded once per prompt list (and device), not per batch or per step."""
        key = (tuple(self.prompts), self.device)
        if self._text is None or self._text[0] != key:
            tok = self.tokenizer(self.prompts + [""], padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            states = self.text_encoder(tok.input_ids.to(self.device))[0]
            self._text = (key, states.to(self.dtype))
        return self._text[1]

    def call(self, net, x_t: Tensor, t: Tensor, c: Tensor | None, emb: Tensor | None = None) -> Tensor:
        """eps of `net` (the base UNet or a copy carrying LoRA) with `emb` added to its time embedding, under
        text CFG as in the official code: eps(empty, null y) + s (eps(c, y) - eps(empty, null y)). The null
        rows of the control embeddings are zero, so the unconditional branch adds nothing."""
        text = self.prompt_embeddings()
        c = torch.full((len(x_t),), self.num_c) if c is None else c
        states, x, t = text[c.to(text.device)], x_t.to(self.device, self.dtype), t.to(self.device)
        cfg = self.guidance != 1.0
        if cfg:  # one batch of 2B: empty prompt first, then the prompts
            states = torch.cat([text[-1:].expand_as(states), states])
            x, t = torch.cat([x, x]), torch.cat([t, t])
            emb = None if emb is None else torch.cat([torch.zeros_like(emb), emb])
        with added_to_time_embedding(net, emb):
            eps = net(x, t, encoder_hidden_states=states).sample
        if cfg:
            eps_empty, eps_c = eps.chunk(2)
            eps = eps_empty + self.guidance * (eps_c - eps_empty)
        return eps.to(x_t.device, x_t.dtype)

    def denoiser(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The pre-trained model (with text CFG) as a Denoiser; it ignores cond.y."""
        return self.call(self.net, x_t, t, cond.c)

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> RGB images in [0, 1] (differentiable; the rewards and oracles read these), in chunks of
        `decode_batch`: the VAE decoder's activations at 512 px are large (the monitor decodes 64 at once)."""
        z = x.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        images = torch.cat([self.vae.decode(z[i:i + self.decode_batch]).sample
                            for i in range(0, len(z), self.decode_batch)])
        return ((images.float() + 1) / 2).clamp(0, 1).to(x.device)

    def classifier_input(self, x0: Tensor) -> Tensor:
        """The decoded image in [-1, 1], clamped like every saved image."""
        return self.decode(x0) * 2 - 1


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise CtrlDiffError(f"--model {path}: no such folder (expected a local diffusers pipeline folder)")
    if not (path / "model_index.json").is_file():
        raise CtrlDiffError(f"--model {path} is not a diffusers pipeline folder (no model_index.json)")
    missing = [p for p in PIPELINE_PARTS if not (path / p).is_dir()]
    if missing:
        raise CtrlDiffError(f"--model {path} lacks the pipeline part(s) {missing}; need {list(PIPELINE_PARTS)}")


def load_sd(path: str | Path, prompts: list[str] | None = None, guidance: float = 7.5,
            resolution: int | None = None, device: str | torch.device = "cpu",
            dtype: str = "float32") -> SDBackend:
    """Load the parts of a local diffusers pipeline folder (never a download; safetensors only, no pickle)
    and wrap them (`wrap_sd`).

    resolution: image side in pixels (default: the UNet's `sample_size` x the VAE's scale, 512 for SD v1.5).
    dtype: of the frozen networks ("float16" halves their memory on a GPU; the trained parameters stay fp32).
    """
    path = Path(path)
    _check_folder(path)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"local_files_only": True, "use_safetensors": True, "torch_dtype": _dtype(dtype)}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kw)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtrlDiffError(f"cannot load the pipeline in {path}: {first}") from None
    return wrap_sd(unet, vae, text_encoder, tokenizer, scheduler, prompts, guidance, resolution, device, dtype,
                   name=str(path))


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CtrlDiffError(f"sd.dtype={name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def wrap_sd(unet, vae, text_encoder, tokenizer, scheduler, prompts: list[str] | None = None,
            guidance: float = 7.5, resolution: int | None = None, device: str | torch.device = "cpu",
            dtype: str = "float32", name: str = "the pipeline") -> SDBackend:
    """The SD backend on pipeline parts, loaded from a folder (`load_sd`) or built in memory (`build_sd_parts`):
    the networks in `dtype` on `device`, the noise schedule from the scheduler's betas."""
    if scheduler.config.prediction_type != "epsilon":
        raise CtrlDiffError(f"{name}: prediction_type={scheduler.config.prediction_type!r}; only epsilon-"
                            "prediction models (SD v1.x) are supported")
    # abar_t in float64 from the pipeline's own betas (SD: "scaled_linear", 0.00085..0.012), on the CPU with the
    # chain's state (a scheduler built under `torch.device("cuda")` holds its betas there)
    schedule = Schedule.from_betas(scheduler.betas.cpu())
    nets = [m.to(dtype=_dtype(dtype)) for m in (unet, vae, text_encoder)]
    backend = SDBackend(*nets, tokenizer, schedule, prompts or read_prompts(), guidance)
    if resolution is not None:
        if resolution % backend.vae_scale:
            raise CtrlDiffError(f"sd.resolution={resolution} is not a multiple of the VAE's scale {backend.vae_scale}")
        backend.latent_size = resolution // backend.vae_scale
    else:
        backend.latent_size = unet.config.sample_size
    return backend.to(device)


# --- SD-shaped pipelines from configs shipped in assets/ (random weights, no download): tests, benchmarks ----

SHAPES = ("tiny", "sd15")  # assets/sd_<shape>.json: a tiny pipeline (tests) and SD v1.5's architecture


def shape_configs(shape: str) -> dict:
    """The configs (unet, vae, text_encoder, scheduler) of a pipeline shape, as diffusers/transformers read them."""
    if shape not in SHAPES:
        raise CtrlDiffError(f"SD shape {shape!r}; choose from {list(SHAPES)}")
    return json.loads(asset_path(f"sd_{shape}.json").read_text())


def local_tokenizer(folder: str | Path):
    """A byte-level CLIP tokenizer with no merges (every character a token; 514 tokens), written into `folder`.
    The text encoder pads every prompt to 77 tokens, so its cost does not depend on the vocabulary."""
    from transformers import CLIPTokenizer

    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_sd_parts(shape: str, tokenizer_folder: str | Path, seed: int = 0) -> dict:
    """unet, vae, text_encoder (random weights, seeded; built on torch's default device, so under
    `torch.device("meta")` nothing is allocated), tokenizer (`local_tokenizer`) and scheduler of a shape."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = shape_configs(shape)
    tok = local_tokenizer(tokenizer_folder)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    return {"unet": UNet2DConditionModel.from_config(cfg["unet"]), "vae": AutoencoderKL.from_config(cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **ids)), "tokenizer": tok,
            "scheduler": DDIMScheduler.from_config(cfg["scheduler"])}


# --- the aesthetic control: an MLP on CLIP image features (the paper's aesthetic classifier) ----------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_THRESHOLD = 5.7  # the paper's "highly aesthetic": LAION predictor score >= 5.7


class ClipFeatures(nn.Module):
    """L2-normalised CLIP image embeddings of images in [-1, 1], differentiable (resize + normalise in torch,
    not the PIL processor), computed on the CLIP model's device and returned on the input's."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_dir():
            raise CtrlDiffError(f"sd.clip={str(path)!r}: no such folder (a local transformers CLIP model)")
        from transformers import CLIPVisionModelWithProjection

        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True,
                                                                      use_safetensors=True)
        except (OSError, ValueError) as e:
            raise CtrlDiffError(f"cannot load CLIP from {path}: {str(e).strip().splitlines()[0]}") from None
        self.clip.eval().requires_grad_(False)
        self.size = self.clip.config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.clip.config.projection_dim

    def forward(self, x: Tensor) -> Tensor:
        dev = self.mean.device
        img = torch.nn.functional.interpolate((x.to(dev) + 1) / 2, size=(self.size, self.size), mode="bicubic",
                                              antialias=True, align_corners=False)
        emb = self.clip(pixel_values=(img - self.mean) / self.std).image_embeds
        return (emb / emb.norm(dim=-1, keepdim=True)).to(x.device)


class AestheticPredictor(nn.Module):
    """The LAION aesthetic predictor's architecture (an MLP from a normalised CLIP ViT-L/14 embedding to a
    score, ~1-10); its published weights load as `layers.{0,2,4,6,7}` once converted to safetensors."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features).squeeze(-1)


class ClipMLPClassifier(nn.Module):
    """p̂(y | x) as an MLP on CLIP features, calibrated by a temperature; the Classifier interface (`log_prob`,
    `predict`) so that it is a RewardTerm's classifier like the CNN."""

    def __init__(self, features: ClipFeatures, num_classes: int, hidden: int = 256, name: str = ""):
        super().__init__()
        self.features, self.name = features, name
        self.head = nn.Sequential(nn.Linear(features.dim, hidden), nn.SiLU(), nn.Linear(hidden, num_classes))
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)) / self.temperature

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        return self(x).log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    @torch.no_grad()
    def predict(self, x: Tensor, batch: int = 64) -> Tensor:
        return torch.cat([self(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])

    def state(self) -> dict[str, Tensor]:
        """Only the fitted part (the head and T): CLIP stays in the user's folder."""
        return {**{f"head.{k}": v for k, v in self.head.state_dict().items()}, "temperature": self.temperature}


def aesthetic_control(clip: ClipFeatures, predictor_path: str | Path | None):
    """The `aesthetic2` Control: class 1 if the LAION predictor scores >= 5.7 (the paper's split). Without
    predictor weights it has no labeller (it can then only be trained from the user's own pairs)."""
    from ..io import load_state, load_weights
    from ..tasks.controls import Control

    labeller = None
    if predictor_path is not None:
        predictor = AestheticPredictor(clip.dim)
        load_state(predictor, load_weights(predictor_path)[0], predictor_path)
        predictor.eval().requires_grad_(False).to(clip.mean.device)

        @torch.no_grad()
        def labeller(images: Tensor) -> Tensor:
            scores = predictor(clip(images * 2 - 1).to(clip.mean.device)).cpu()
            return (scores >= AESTHETIC_THRESHOLD).long()

    return Control("aesthetic2", 2, labeller, ("below 5.7", "aesthetic >= 5.7"))
