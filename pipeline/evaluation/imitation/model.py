"""The MusicLDM-shaped imitator: a diffusers UNet2DModel conditioned on CLAP, its training (resumable
from checkpoints) and DDIM sampling."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.evaluation.imitation.config import EMBED_DIM, ImitationConfig, ModelSection, TrainSection
from pipeline.evaluation.imitation.data import MelFrontEnd

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------- the model


class ConditionedUNet(nn.Module):
    """diffusers UNet2DModel with a CLAP embedding as its class embedding: the embedding is
    standardised (training-set mean/std), dropped to a learned null vector, projected to the
    time-embedding size and added to the time embedding (`class_embed_type="identity"`)."""

    def __init__(self, cfg: ModelSection, n_mels: int, frames: int, num_train_timesteps: int):
        super().__init__()
        from diffusers import UNet2DModel

        time_dim = cfg.block_out_channels[0] * 4  # UNet2DModel's time-embedding size
        self.unet = UNet2DModel(
            sample_size=(n_mels, frames),
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            add_attention=cfg.mid_attention,
            attention_head_dim=cfg.attention_head_dim,
            class_embed_type="identity",
            num_train_timesteps=num_train_timesteps,
        )
        self.cond_proj = nn.Sequential(nn.Linear(EMBED_DIM, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.null = nn.Parameter(torch.randn(EMBED_DIM) * 0.5)
        self.register_buffer("cond_mean", torch.zeros(EMBED_DIM))
        self.register_buffer("cond_std", torch.ones(()))

    def set_condition_stats(self, conds: torch.Tensor) -> None:
        self.cond_mean.copy_(conds.mean(0))
        self.cond_std.copy_((conds - conds.mean(0)).pow(2).sum(-1).mean().sqrt().clamp(min=1e-6) / EMBED_DIM**0.5)

    def condition(self, e: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        z = (e - self.cond_mean) / self.cond_std
        return torch.where(drop[:, None], self.null.expand_as(z), z)

    def forward(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=self.cond_proj(self.condition(e, drop))).sample


def build_scheduler(cfg: TrainSection):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        clip_sample=False,
        prediction_type="epsilon",
    )


def build_model(cfg: ImitationConfig, front: MelFrontEnd) -> ConditionedUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return ConditionedUNet(cfg.model, cfg.mel.n_mels, front.frames, cfg.train.num_train_timesteps)


def _autocast(precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_state(folder, name: str, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    folder.write_atomic(name, buffer.getvalue())


def load_state(folder, name: str) -> Any | None:
    try:
        with folder.fs.open(folder.key(name), "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None


def train_model(
    cfg: ImitationConfig, name: str, data: dict[str, Any], front: MelFrontEnd, device: torch.device, folder
) -> tuple[ConditionedUNet, list[float]]:
    """Train one model on `name`'s (log-mel, CLAP) pairs; resumes from `ckpt-<name>.pt` when its
    config digest matches. Batches, timesteps, noise and condition drops come from one generator
    seeded by train.seed: identical for the three models."""
    from tqdm.auto import tqdm

    t = cfg.train
    model = build_model(cfg, front).to(device)
    x0_all = front.normalise(data[f"{name}/logmel"])[:, None]  # [N, 1, mels, frames]
    conds = data[f"{name}/cond"]
    model.set_condition_stats(conds.to(device))
    scheduler = build_scheduler(t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(t.seed)
    losses: list[float] = []
    start = 0
    digest = cfg.digest("mel", "model", "train", "catalog", "attack", "encoder")
    ckpt_name = f"ckpt-{name}.pt"
    saved = load_state(folder, ckpt_name)
    if saved is not None and saved.get("digest") == digest:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        losses, start = list(saved["losses"]), int(saved["step"])
        logger.info("%s: resumed at step %d", name, start)
    elif saved is not None:
        logger.warning("%s: checkpoint is from another configuration; training from scratch", name)

    def lr_at(step: int) -> float:
        return t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))

    n = x0_all.shape[0]
    model.train()
    bar = tqdm(range(start, t.steps), desc=f"train {name}", disable=not cfg.progress, initial=start, total=t.steps)
    for step in bar:
        index = torch.randint(0, n, (t.batch_size,), generator=generator)
        timesteps = torch.randint(0, t.num_train_timesteps, (t.batch_size,), generator=generator)
        noise = torch.randn((t.batch_size, *x0_all.shape[1:]), generator=generator)
        drop = torch.rand(t.batch_size, generator=generator) < cfg.model.cond_dropout
        x0 = x0_all[index].to(device)
        noisy = scheduler.add_noise(x0, noise.to(device), timesteps.to(device))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with _autocast(t.precision):
            predicted = model(noisy, timesteps.to(device), conds[index].to(device), drop.to(device))
        loss = torch.nn.functional.mse_loss(predicted.float(), noise.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        done = step + 1
        if t.checkpoint_every > 0 and (done % t.checkpoint_every == 0 or done == t.steps):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "losses": losses,
                "step": done,
                "digest": digest,
            }
            save_state(folder, ckpt_name, state)
    bar.close()
    model.eval()
    return model, losses


@torch.no_grad()
def sample_mels(
    cfg: ImitationConfig,
    model: ConditionedUNet,
    prompts: torch.Tensor,
    conditional: bool,
    front: MelFrontEnd,
    device: torch.device,
    desc: str,
) -> torch.Tensor:
    """DDIM samples, one per prompt row, as log-mel [N, n_mels, frames]. The initial noise of row
    i is seeded by (sample.seed, i): the same for every model and for both modes."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    s = cfg.sample
    scheduler = DDIMScheduler.from_config(build_scheduler(cfg.train).config)
    scheduler.set_timesteps(s.steps)
    out = []
    shape = (1, cfg.mel.n_mels, front.frames)
    batches = range(0, prompts.shape[0], s.batch)
    bar = tqdm(total=len(batches) * s.steps, desc=desc, disable=not cfg.progress)
    for begin in batches:
        e = prompts[begin : begin + s.batch].to(device)
        b = e.shape[0]
        x = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + begin + i))
                for i in range(b)
            ]
        ).to(device)
        cond_drop = torch.full((b,), not conditional, device=device)
        null_drop = torch.ones(b, dtype=torch.bool, device=device)
        guided = conditional and s.guidance_scale != 1.0
        for timestep in scheduler.timesteps:
            tt = torch.full((b,), int(timestep), device=device)
            with _autocast(cfg.train.precision):
                if guided:
                    both = model(
                        torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([e, e]), torch.cat([cond_drop, null_drop])
                    ).float()
                    eps_c, eps_u = both.chunk(2)
                    eps = eps_u + s.guidance_scale * (eps_c - eps_u)
                else:
                    eps = model(x, tt, e, cond_drop).float()
            x = scheduler.step(eps, timestep, x, eta=s.eta).prev_sample
            bar.update(1)
        out.append(front.denormalise(x[:, 0]).float().cpu())
    bar.close()
    return torch.cat(out)
