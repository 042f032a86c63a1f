"""``ex4d train``: train the EX-4D adapter (LoRA + CamVidEncoder) on pairs from ``ex4d make-pairs``."""

from __future__ import annotations

import argparse
import sys

from ex4d.commands.common import progress

EPILOG = """examples:
  ex4d train pairs/ -o runs/ex4d --models-dir models --steps 2000
  ex4d train pairs/ -o runs/ex4d --init-adapter models/EX-4D/ex4d.ckpt --lr 3e-5   # fine-tune the release
  accelerate launch --num_processes 8 -m ex4d.cli train pairs/ -o runs/ex4d --models-dir models  # 8 GPUs (DDP)
  accelerate launch --config_file fsdp2.yaml -m ex4d.cli train pairs/ ...   # FSDP2 (docs/training.md; untested on GPUs)

Rerunning the same command resumes from the latest checkpoint in -o (--resume none starts over).
Checkpoints: <out>/checkpoints/step-N/ (ex4d.ckpt loads with `ex4d generate --adapter`); final: <out>/final/.
Details, the objective and multi-GPU setups: docs/training.md.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the EX-4D adapter on simulated-mask pairs",
        description="Train the LoRA and the CamVidEncoder of EX-4D (everything else frozen) with the flow-matching "
                    "objective of the shift-5 sampler, on pairs made by `ex4d make-pairs`.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="pair folder(s) written by ex4d make-pairs")
    parser.add_argument("-o", "--output", required=True,
                        help="run folder: checkpoints, log.csv, final adapter (required)")
    parser.add_argument("--models-dir", default=None,
                        help="folder with the Wan2.1-I2V weights (docs/models.md); default: the Hugging Face cache")
    parser.add_argument("--layout", choices=["auto", "original", "diffusers"], default="auto",
                        help="layout of the Wan weights: original (the Wan-AI release), diffusers, or auto = "
                             "detect (default auto)")
    parser.add_argument("--init-adapter", default=None,
                        help="start from this adapter (ex4d.ckpt / adapter.safetensors); default: a fresh adapter "
                             "(an exact no-op on the base model)")
    parser.add_argument("--num-frames", type=int, default=49, help="frames per clip, 4k+1 (default 49)")
    parser.add_argument("--size", default="512x512", metavar="HxW",
                        help="training size HxW, multiples of 16 (default 512x512, as the released model)")
    parser.add_argument("--validation-pairs", type=int, default=0,
                        help="hold out this many clips (the first ones) for validation samples (default 0)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=1, help="clips per GPU and micro-batch (default 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 0.01)")
    g.add_argument("--lr-schedule", default="constant_with_warmup",
                   help="constant, constant_with_warmup (default), cosine, linear, ... (diffusers names)")
    g.add_argument("--warmup", type=int, default=0, help="warm-up steps (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 disables (default 1)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the LoRA initialisation, the data order and every sample's draws (default 0)")
    g.add_argument("--checkpoint-every", type=int, default=500,
                   help="write a checkpoint every N steps; 0 = only at the end (default 500)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="how many to keep; 0 keeps all (default 3)")
    g.add_argument("--validate-every", type=int, default=0,
                   help="validation samples every N steps; 0 = never (default 0)")
    g.add_argument("--num-workers", type=int, default=2, help="data-loading processes (default 2)")
    g.add_argument("--resume", default="auto",
                   help="auto = the latest checkpoint in -o, if any (default); none = start over; or a checkpoint "
                        "folder")
    m = parser.add_argument_group("model")
    m.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16, as released)")
    m.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / rank (default 16)")
    m.add_argument("--lora-targets", default="q,k,v,o,ffn.0,ffn.2",
                   help="reference names, comma-separated (default q,k,v,o,ffn.0,ffn.2 = all ten linears per block)")
    m.add_argument("--encoder-hidden", type=int, default=1024,
                   help="CamVidEncoder width (default 1024, as released)")
    m.add_argument("--prompt", default=None, help="training prompt (default: the inference prompt)")
    m.add_argument("--timestep-sampling", choices=["uniform", "logit_normal"], default="uniform",
                   help="how training timesteps are drawn: uniform over the shifted schedule, or logit_normal "
                        "(default uniform)")
    m.add_argument("--timestep-weighting", choices=["diffsynth", "none"], default="diffsynth",
                   help="loss weight per timestep: diffsynth (the DiffSynth-Studio recipe) or none (default diffsynth)")
    m.add_argument("--no-erode", action="store_true", help="do not erode masks (default: erode, as inference does)")
    m.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep DiT activations: faster, much more memory (default: gradient checkpointing on)")
    m.add_argument("--cache-encodings", action="store_true",
                   help="keep VAE/CLIP encodings of each clip in memory: faster epochs, more RAM (default: off)")
    m.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="frozen base weights: auto = bf16 on GPU, fp32 on CPU (default auto); trainables are "
                        "always fp32")
    parser.set_defaults(func=main)


def main(args) -> int:
    import torch

    from ex4d.errors import InputError
    from ex4d.train.dataset import PairDataset
    from ex4d.train.options import parse_size
    from ex4d.train.trainer import (TrainConfig, check_resumable, check_run_folder, find_resume_checkpoint,
                                    make_accelerator, read_checkpoint_record, train)
    from ex4d.train.wan_system import EX4DTrainSystem, ModelConfig, encode_prompts, model_mismatches

    config = TrainConfig(output_dir=args.output, max_steps=args.steps, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, learning_rate=args.lr, weight_decay=args.weight_decay,
                         lr_schedule=args.lr_schedule, warmup_steps=args.warmup, max_grad_norm=args.max_grad_norm,
                         seed=args.seed, checkpoint_every=args.checkpoint_every,
                         keep_checkpoints=args.keep_checkpoints, validate_every=args.validate_every,
                         num_workers=args.num_workers)
    config.validate()
    size = parse_size(args.size, multiple=16, minimum=16)
    model_config = ModelConfig(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                               lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                               encoder_hidden=args.encoder_hidden, init_adapter=args.init_adapter, prompt=args.prompt,
                               timestep_sampling=args.timestep_sampling, timestep_weighting=args.timestep_weighting,
                               gradient_checkpointing=not args.no_gradient_checkpointing, erode=not args.no_erode,
                               cache_encodings=args.cache_encodings)
    # Everything that can be refused is checked before the (minutes-long) model load.
    check_run_folder(args.output)
    resume_dir = find_resume_checkpoint(args.output, args.resume)
    if resume_dir is not None:
        state = read_checkpoint_record(resume_dir)
        check_resumable(resume_dir, state, config, model_mismatches(model_config, state.get("system") or {}))
    dataset = PairDataset(args.datasets, size=size, num_frames=args.num_frames)
    from ex4d.weights_preflight import check_weights
    check_weights(wan=True, models_dir=args.models_dir, layout=args.layout)  # every missing Wan file, before any load
    validation = []
    if args.validation_pairs > 0:
        if args.validation_pairs >= len(dataset):
            raise InputError(f"--validation-pairs {args.validation_pairs} leaves no training clip "
                             f"(the dataset has {len(dataset)})")
        validation = [dataset.load(i) for i in range(args.validation_pairs)]
        dataset = torch.utils.data.Subset(dataset, range(args.validation_pairs, len(dataset)))

    # cpu=True without a GPU, so that CPU processes started by torchrun form one (gloo) DDP group
    accelerator = make_accelerator()
    cuda = accelerator.device.type == "cuda"
    # multi-process CPU runs report "cpu:<rank>", which safetensors' loader refuses
    device = accelerator.device if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype,
                                                                torch.bfloat16 if cuda else torch.float32)
    from ex4d.diffusion.weights import load_wan_components

    components = load_wan_components(args.models_dir, layout=args.layout, torch_dtype=dtype, device=device)
    # Encode the prompt once and drop umT5 (11 GB in bf16): nothing else needs it during training.
    positive, negative = encode_prompts(components, args.prompt, device=device)
    components.pop("text_encoder", None)
    if cuda:
        torch.cuda.empty_cache()
    # The LoRA A matrices are drawn at random (Kaiming): from --seed, not from whatever the RNG
    # state is after loading, so that runs (and the processes of one run) start identically.
    torch.manual_seed(args.seed)
    system = EX4DTrainSystem(components, model_config, text_embeds=positive, negative_text_embeds=negative,
                             validation=validation, base_dtype=dtype)
    result = train(system, dataset, config, resume=str(resume_dir) if resume_dir else "none",
                   accelerator=accelerator, progress=progress if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        final = result.final_dir if result.final_dir is not None else "(not reached)"
        print(f"trained to step {result.step}; final adapter: {final}", file=sys.stdout)
    return 0
