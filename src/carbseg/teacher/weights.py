"""Building an open_clip model and loading CLIP weights: a tag, a local file, or none.

Sources of ``--clip-pretrained``:
- an open_clip tag (``openai``, ``laion2b_s34b_b88k`` ...): the Hugging Face cache is tried first;
  the network only when the cache misses and ``HF_HUB_OFFLINE`` is not set, with a short timeout;
- a local file: OpenAI's TorchScript archive (``ViT-B-16.pt``; only its ``state_dict()`` is used),
  or an open_clip state dict as ``.bin``/``.pth`` (``torch.load(weights_only=True)``) or
  ``.safetensors``;
- ``none``: random initialisation (the masks are then meaningless; a loud warning says so).

``--clip-model`` is an open_clip model name (``ViT-B-16``) or a JSON model config file (the
format of open_clip's ``model_configs/*.json``), which is how tiny test models are described.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

from carbseg.errors import MissingWeightsError, UserError
from carbseg.safe_load import one_line_reason, torch_load_weights_only

log = logging.getLogger(__name__)

NO_WEIGHTS = "none"
HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from, resolved before anything is written (``path`` is None for none)."""

    model: str
    pretrained: str
    path: Path | None
    quick_gelu: bool

    def cache_key(self) -> str:
        """Identifies model + weights for caches: tag name, or file path with size and mtime."""
        if self.path is None or self.pretrained != str(self.path):
            return f"{self.model}|{self.pretrained}|qg={self.quick_gelu}"
        stat = self.path.stat()
        return f"{self.model}|{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|qg={self.quick_gelu}"


def model_config(model: str) -> dict:
    """The open_clip config dict of a model name, or of a JSON file."""
    if model.endswith(".json"):
        path = Path(model)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: CLIP model config not found; give an open_clip name such as ViT-B-16") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")][:12]
        raise UserError(f"unknown CLIP model {model!r}; use an open_clip name such as {', '.join(vits)} "
                        "or a JSON model config file")
    return cfg


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers a TCP connection at all (one try, ``timeout`` seconds).

    Without it, huggingface_hub retries an unreachable host for about a minute, logging a line per
    retry, before it gives up; with it, an offline machine learns in seconds that only the cache counts.
    Behind an HTTP(S) proxy the direct probe says nothing, so the download is simply tried.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_file(repo_and_file: str, cache_dir: str | None) -> Path | None:
    """A weights file from the Hugging Face hub: the cache first, then (if allowed and the hub is
    reachable) one short download attempt, its retry warnings kept off the terminal."""
    from huggingface_hub import hf_hub_download

    repo_id, filename = os.path.split(repo_and_file)
    candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for local_only in (True, False):
        if not local_only and (hub_offline() or not hub_reachable()):
            break
        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)
        try:
            for name in candidates:
                try:
                    kwargs = {} if local_only else {"etag_timeout": HUB_TIMEOUT_S}
                    return Path(hf_hub_download(repo_id=repo_id, filename=name, cache_dir=cache_dir,
                                                local_files_only=local_only, **kwargs))
                except Exception as err:  # noqa: BLE001 - any hub failure means "not available here"
                    log.debug("hub %s/%s (local_only=%s): %s", repo_id, name, local_only, err)
        finally:
            hub_log.setLevel(level)
    return None


def cached_clip_weights(cache_dir: str | None = None) -> list[str]:
    """``MODEL/TAG`` of the open_clip weights already in the Hugging Face cache (for ``carbseg doctor``)."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = {repo.repo_id for repo in scan_cache_dir(cache_dir).repos}
    except Exception:  # noqa: BLE001 - no cache yet, or an unreadable one: nothing found
        return []
    found = []
    for model, tag in open_clip.list_pretrained():
        hub = (open_clip.get_pretrained_cfg(model, tag) or {}).get("hf_hub", "")
        if hub and "/".join(hub.rstrip("/").split("/")[:2]) in repos:
            found.append(f"{model}/{tag}")
    return found


def resolve_weights(model: str, pretrained: str, cache_dir: str | None = None) -> WeightsSource:
    """Find the weights without building the model; raise MissingWeightsError when unavailable.

    Called before any output folder is created, so a missing file leaves nothing behind.
    """
    model_config(model)  # validates the name early
    if pretrained.lower() == NO_WEIGHTS:
        return WeightsSource(model, NO_WEIGHTS, None, quick_gelu=False)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return WeightsSource(model, str(path), path, quick_gelu=_is_torchscript_archive(path))
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path:
        raise MissingWeightsError(f"{pretrained}: CLIP weights file not found; check the path given to "
                                  "--clip-pretrained")
    cfg = open_clip.get_pretrained_cfg(model, pretrained) if not model.endswith(".json") else {}
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model) if not model.endswith(".json") else []
        raise UserError(f"--clip-pretrained {pretrained!r} is not an open_clip tag for {model}; valid tags: "
                        f"{', '.join(tags) or '(none)'}, or a local weights file, or none")
    found = _hub_file(cfg["hf_hub"], cache_dir) if cfg.get("hf_hub") else None
    if found is None:
        raise MissingWeightsError(
            f"CLIP weights {model}/{pretrained} are not in the cache and cannot be downloaded ("
            + ("HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face hub is not reachable")
            + "); download them on a machine with network (see docs/teacher.md) and pass the file with "
            "--clip-pretrained PATH"
        )
    return WeightsSource(model, pretrained, found, quick_gelu=bool(cfg.get("quick_gelu", False)))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    expected = "expected an OpenAI .pt archive, an open_clip .bin or a .safetensors file"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - a damaged or disguised file (e.g. a pickle renamed)
            raise UserError(f"{path}: cannot read CLIP weights ({one_line_reason(err)}); {expected}") from None
    if _is_torchscript_archive(path):
        # OpenAI's release format. torch.jit.load runs no pickle payload, but the archive holds
        # TorchScript code: we never call it and keep only the tensors of its state_dict().
        try:
            archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - e.g. a forged archive around a pickle payload
            raise UserError(f"{path}: cannot read CLIP weights as a TorchScript archive "
                            f"({one_line_reason(err)}); {expected}") from None
        state = {k: v.detach().clone() for k, v in archive.state_dict().items()}
    else:
        state = torch_load_weights_only(path, f"CLIP weights: {expected}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: does not contain a state dict of CLIP weights")
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archive metadata
        state.pop(key, None)
    return state


def build_clip_model(source: WeightsSource, device="cpu") -> nn.Module:
    """An eval-mode fp32 open_clip CLIP model with the resolved weights loaded (or random ones)."""
    cfg = dict(model_config(source.model))
    if source.quick_gelu:
        cfg["quick_gelu"] = True
    cfg.pop("custom_text", None)
    for key in ("hf_tokenizer_name", "tokenizer_kwargs"):
        cfg.pop(key, None)
    # A fixed seed makes `none` reproducible (the same random model, and cached text embeddings
    # that match it) without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**cfg)
    if source.path is None:
        log.warning("!!! CLIP weights: none -- the model is RANDOMLY INITIALISED; its pseudo-masks are "
                    "MEANINGLESS (use this only to test the pipeline) !!!")
    else:
        state = _load_state_dict(source.path)
        wanted = model.state_dict()
        misshapen = [k for k, v in state.items() if k in wanted and tuple(v.shape) != tuple(wanted[k].shape)]
        if misshapen:
            k = misshapen[0]
            raise UserError(f"{source.path}: weights do not fit CLIP model {source.model} ({k}: "
                            f"{tuple(state[k].shape)} vs {tuple(wanted[k].shape)}); pass the matching --clip-model")
        missing, unexpected = model.load_state_dict(state, strict=False)
        # attn_mask is a buffer rebuilt from the config (TorchScript archives carry it); weights must all match.
        missing = [k for k in missing if not k.endswith("attn_mask")]
        unexpected = [k for k in unexpected if not k.endswith("attn_mask")]
        if missing or unexpected:
            raise UserError(f"{source.path}: weights do not fit CLIP model {source.model} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass the matching --clip-model")
    return model.float().eval().requires_grad_(False).to(device)


def load_clip(model: str, pretrained: str, device="cpu", cache_dir: str | None = None) -> tuple[nn.Module, WeightsSource]:
    source = resolve_weights(model, pretrained, cache_dir)
    return build_clip_model(source, device), source
