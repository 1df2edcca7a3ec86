"""mnist_cond sized for a laptop / 2-core CPU: the README's main job (about 10 minutes).

The seed's recipe (EDM preconditioning and loss weighting with sigma_data 1, ClassEmbedder with
ucg 0.2, EulerEDM + CFG 3) with four changes that buy recognisable digits in minutes
(benchmarks/mnist_quality.py; class accuracy after 5 CPU-minutes, 100 digits, lr 2e-3 each):

* UNet: one residual block per level instead of four, and `conv_resample=False` (average-pool
  down, nearest up, no 3x3 conv): 23% -> 50%, and 15% more steps per minute.
* EDMSampling `p_mean` -1.2 -> 0 (median sigma 0.3 -> 1): training sees sigma > 1, where a
  digit's shape is decided, half of the time instead of 16%. With the seed's UNet resampling:
  -1.2 23%, -0.5 57%, 0.0 90%; -0.5 with the pool/nearest UNet 88%.
* batch 32 instead of 512, AdamW lr 2e-3 with 50 warm-up steps (the seed: 1e-4 for batch 512).
* an EMA of the weights for the samples.
"""

from sgm_jax.configs import mnist_cond


def get_config():
    config = mnist_cond.get_config()
    config.model.base_learning_rate = 2.0e-3
    config.model.params.use_ema = True
    config.model.params.network_config = mnist_cond.unet(num_res_blocks=1, conv_resample=False)
    config.model.params.loss_fn_config.params.sigma_sampler_config.params = {"p_mean": 0.0, "p_std": 1.2}
    config.data.params.batch_size = 32
    config.training.update(name="mnist_cond_cpu", max_minutes=10.0, warmup_steps=50, log_every=10,
                           sample_every=300, checkpoint_every=300, num_samples=40, sample_nrow=10)
    return config
