"""Train the stand-in from scratch: classifier, VAE, then UNet + text encoder.

    python -m fasterdiff.tools.standin.train            # about 50 minutes on 2 CPU cores

Writes ``standin/pipeline`` (an SD-format folder), ``standin/classifier.safetensors``,
``standin/heldout.npz`` (the held-out digits, the real reference) and
``standin/training.json`` (settings, losses, accuracies, minutes per stage).
Everything is seeded; the MNIST digits are read from ``standin/mnist_5k.npz``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...calibrate import PROMPTS_FILE_NAME
from ..tiny import SD15_SCHEDULER_CONFIG, assemble
from . import STANDIN_DIR, data, models


@dataclass
class TrainConfig:
    seed: int = 0
    classifier_steps: int = 600
    classifier_batch: int = 128
    vae_steps: int = 800
    vae_batch: int = 64
    vae_kl_weight: float = 1e-5
    unet_steps: int = 3000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    uncond_prob: float = 0.1  # prompts dropped to "" so classifier-free guidance works
    ema_decay: float = 0.999


def _colour_jitter(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Scale each channel's brightness by 0.8-1.0 and shift by up to 2 pixels (classifier only)."""
    scale = 0.8 + 0.2 * torch.rand(images.shape[0], 3, 1, 1, generator=g)
    images = (images + 1) * scale - 1
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(cfg, digits, labels, thick, g, log) -> models.Classifier:
    """On the held-out digits: 80 per digit to train, 20 per digit to validate."""
    fit, val = data.classifier_split(labels)
    net = models.Classifier()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=cfg.classifier_steps)
    net.train()
    for _ in tqdm(range(cfg.classifier_steps), desc="classifier", unit="step"):
        idx = fit[torch.randint(len(fit), (cfg.classifier_batch,), generator=g).numpy()]
        colors = torch.randint(len(data.COLORS), (len(idx),), generator=g)
        images = _colour_jitter(data.render(digits[idx], colors), g)
        out = net(images)
        loss = (
            F.cross_entropy(out["digit"], torch.as_tensor(labels[idx]))
            + F.cross_entropy(out["color"], colors)
            + F.cross_entropy(out["thickness"], torch.as_tensor(thick[idx]))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        accs = {name: [] for name in ("digit", "color", "thickness")}
        for c in range(len(data.COLORS)):  # every validation digit in every colour
            out = net(data.render(digits[val], np.full(len(val), c)))
            accs["digit"].append((out["digit"].argmax(1).numpy() == labels[val]).mean())
            accs["color"].append((out["color"].argmax(1).numpy() == c).mean())
            accs["thickness"].append((out["thickness"].argmax(1).numpy() == thick[val]).mean())
    log["classifier_validation_accuracy"] = {k: float(np.mean(v)) for k, v in accs.items()}
    log["classifier_final_loss"] = float(loss.detach())
    return net


def train_vae(cfg, digits, g, log):
    vae = models.vae()
    opt = torch.optim.AdamW(vae.parameters(), 1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=cfg.vae_steps)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="vae", unit="step")
    for _ in bar:
        idx = torch.randint(len(digits), (cfg.vae_batch,), generator=g).numpy()
        images = data.render(digits[idx], torch.randint(len(data.COLORS), (len(idx),), generator=g))
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        rec_loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        loss = rec_loss + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec_loss.item():.4f}")
    vae.eval()
    log["vae_final_reconstruction_loss"] = float(rec_loss.detach())
    return vae


@torch.no_grad()
def encode_all(vae, digits):
    """Posterior mean and std of every (training digit, colour) pair."""
    means, stds = [], []
    for c in range(len(data.COLORS)):
        for chunk in np.array_split(np.arange(len(digits)), max(1, len(digits) // 256)):
            dist = vae.encode(data.render(digits[chunk], np.full(len(chunk), c))).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(cfg, tok, vae, digits, labels, thick, g, log):
    mean, std = encode_all(vae, digits)
    n = len(digits)
    scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=g)).std())
    vae.register_to_config(scaling_factor=scaling)
    log["vae_scaling_factor"] = scaling
    # Row k of mean/std is digit k % n in colour k // n.
    colour_of = np.repeat(np.arange(len(data.COLORS)), n)
    image_of = np.tile(np.arange(n), len(data.COLORS))
    prompts = [data.Attributes(int(labels[i]), int(c), int(thick[i])).prompt for i, c in zip(image_of, colour_of)]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    empty = tok("", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids

    text = models.text_encoder(len(tok))
    unet = models.unet()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, cfg.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.unet_lr, total_steps=cfg.unet_steps, pct_start=0.05)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    noise_sched = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    unet.train()
    text.train()
    losses = []
    bar = tqdm(range(cfg.unet_steps), desc="unet + text encoder", unit="step")
    for step in bar:
        k = torch.randint(len(mean), (cfg.unet_batch,), generator=g)
        z0 = (mean[k] + std[k] * torch.randn(mean[k].shape, generator=g)) * scaling
        batch_ids = ids[k].clone()
        drop = torch.rand(len(k), generator=g) < cfg.uncond_prob
        batch_ids[drop] = empty
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(k),), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text(batch_ids)[0]
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    log["unet_loss_curve"] = [float(np.mean(losses[i : i + 200])) for i in range(0, len(losses), 200)]
    return ema_unet, ema_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasterdiff.tools.standin.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=STANDIN_DIR, help="output folder (default: standin/)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.01: a smoke run)")
    parser.add_argument(
        "--limit", type=int, default=None, help="train the generator on the first N digits only (smoke runs)"
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig()
    for name in ("classifier_steps", "vae_steps", "unet_steps"):
        setattr(cfg, name, max(1, round(getattr(cfg, name) * args.scale)))
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    digits, labels = data.load_mnist()
    train_idx, held_idx = data.split(labels)
    train_idx = (
        train_idx[np.random.default_rng(cfg.seed).permutation(len(train_idx))[: args.limit]]
        if args.limit
        else train_idx
    )
    thresholds = data.thickness_thresholds(digits[train_idx], labels[train_idx])
    thick = data.thickness_labels(digits, labels, thresholds)
    log: dict = {"config": asdict(cfg), "torch_threads": torch.get_num_threads(), "minutes": {}}

    def stage(name, fn, *a):
        t0 = time.perf_counter()
        result = fn(*a)
        log["minutes"][name] = round((time.perf_counter() - t0) / 60, 2)
        return result

    classifier = stage("classifier", train_classifier, cfg, digits[held_idx], labels[held_idx], thick[held_idx], g, log)
    vae = stage("vae", train_vae, cfg, digits[train_idx], g, log)
    tok = models.tokenizer()
    unet, text = stage(
        "unet", train_unet, cfg, tok, vae, digits[train_idx], labels[train_idx], thick[train_idx], g, log
    )
    log["minutes"]["total"] = round(sum(log["minutes"].values()), 2)

    args.out.mkdir(parents=True, exist_ok=True)
    assemble(tok, text, vae, unet).save_pretrained(args.out / "pipeline")
    # its own calibration prompts, which calibration on the spot reads beside the weights
    (args.out / "pipeline" / PROMPTS_FILE_NAME).write_text("\n".join(data.calibration_pairs(90)[0]) + "\n")
    save_file(classifier.state_dict(), str(args.out / "classifier.safetensors"))
    np.savez_compressed(
        args.out / "heldout.npz",
        digits=digits[held_idx],
        labels=labels[held_idx],
        thickness=thick[held_idx],
        thickness_thresholds=thresholds,
    )
    (args.out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "unet_loss_curve"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
