"""mnist_cond sized for a laptop / 2-core CPU: the README's main job (about 10 minutes).

Same seed recipe (EDM preconditioning and weighting, sigma_data 1, ClassEmbedder with ucg 0.2,
EulerEDM + CFG 3), with a UNet of one residual block per level instead of four, batch 32
instead of 512, a 10x learning rate to learn in few steps, and an EMA for the samples.
"""

from configs import mnist_cond


def get_config():
    config = mnist_cond.get_config()
    config.model.base_learning_rate = 1.0e-3
    config.model.params.use_ema = True
    config.model.params.network_config = mnist_cond.unet(num_res_blocks=1)
    config.data.params.batch_size = 32
    config.training.update(name="mnist_cond_cpu", max_minutes=10.0, log_every=10, sample_every=200,
                           checkpoint_every=200, num_samples=40, sample_nrow=10)
    return config
