"""Text-to-image on real MNIST, CPU-sized: the whole latent text-to-image path of txt2img_clipl
(frozen first stage, trainable CLIP-architecture text tower with the real CLIP BPE tokenizer,
cross-attention UNet, captions from tar shards) at a size a 2-core CPU trains.

    python train.py --config configs/autoencoder_mnist.py                    # the first stage
    python -m sgm_jax.data.mnist_captions data/mnist_txt2img                 # captioned shards
    python train.py --config configs/mnist_txt2img.py
    python sample.py --workdir workdir/mnist_txt2img --prompt "a photo of the number seven"

* first stage: the f4 MNIST autoencoder's workdir (32 x 32 digits -> 8 x 8 x 4 latents), frozen;
  scale_factor makes its latents unit-variance (measured on training digits, see the note below);
* text: FrozenCLIPEmbedder's architecture at width 64, 2 layers, 16 tokens, trained from scratch
  (is_trainable, as txt2img-clipl trains its CLIP), 10% of captions dropped for CFG;
* UNet: 64 channels, levels (1, 2), one res block each, cross-attention at 8x8 and 4x4, the
  pooled text as `y`; EDM preconditioning with mnist_cond_cpu's noise distribution;
* captions (sgm_jax.data.mnist_captions) are composed from 23 phrases naming the digit inside 21
  frames, 30% with a random word of the CLIP vocabulary inserted; held-out wordings, whose words
  "photo", "image", "drawn", "an" and "," never occur in training, are for evaluation.
"""

from sgm_jax.checkpointing.workdirs import first_stage_config
from sgm_jax.configs import _training_parts as T
from sgm_jax.configs import autoencoder_mnist, mnist_cond
from sgm_jax.configs.inference import _parts as P

WIDTH, TOKENS = 64, 16
# 1 / std of the posterior-mean latents of 2,048 training digits under workdir/autoencoder_mnist
# (benchmarks/latent_scale.py; 1.5555 for the README run: recompute after retraining the autoencoder)
SCALE_FACTOR = 0.6429


def first_stage() -> dict:
    fs = first_stage_config(autoencoder_mnist.get_config().model)
    fs["params"]["ckpt_path"] = "workdir/autoencoder_mnist"  # its train.py workdir (EMA weights)
    return fs


def get_config():
    config = mnist_cond.get_config()
    network = P.unet(in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[1, 2],
                     num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32, num_classes="sequential",
                     adm_in_channels=WIDTH, transformer_depth=1, context_dim=WIDTH, conv_resample=False)
    text = {"is_trainable": True, "input_key": "txt", "ucg_rate": 0.1,
            "target": f"{P.ENCODERS}.FrozenCLIPEmbedder",
            "params": {"always_return_pooled": True, "width": WIDTH, "layers": 2, "heads": 2,
                       "max_length": TOKENS}}
    params = config.model.params
    params.network_config = network
    params.conditioner_config = P.conditioner(text)
    params.first_stage_config = first_stage()
    params.scale_factor = SCALE_FACTOR
    params.use_ema = True
    params.loss_fn_config.params.sigma_sampler_config.params = {"p_mean": 0.0, "p_std": 1.2}
    config.model.base_learning_rate = 1.0e-3
    pipeline = T.image_datapipeline(32, "data/mnist_txt2img/train-{000000..000029}.tar", decoder="l8",
                                    shuffle=2000)
    pipeline["postprocessors"] = pipeline["postprocessors"][:2]  # stored at 32 x 32: no resize, no crop
    pipeline["postprocessors"][0]["params"]["transforms"] = [{"target": "torchvision.transforms.ToTensor"}]
    config.data = T.streaming_data(pipeline, batch_size=32, num_workers=0)
    config.training.update(name="mnist_txt2img", max_steps=100000, max_minutes=20.0, warmup_steps=100, log_every=25,
                           checkpoint_every=500, sample_every=500, num_samples=20, sample_nrow=10, sample_classes=(),
                           sample_prompts=tuple(f"a photo of the number {w}" for w in (
                               "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")))
    return config
