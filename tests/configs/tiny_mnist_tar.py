"""mnist_cond_tar at test size: a 1-level UNet, batch 8, no EMA; the shards come from --config.data...urls."""

from sgm_jax.configs import mnist_cond, mnist_cond_tar


def get_config():
    config = mnist_cond_tar.get_config()
    config.model.params.network_config = mnist_cond.unet(num_res_blocks=1, channel_mult=[1], model_channels=32,
                                                         num_head_channels=32)
    config.data.params.train.datapipeline = mnist_cond_tar.datapipeline(sample_shuffle=6)
    config.data.params.train.loader.batch_size = 8
    config.training.update(name="tiny_mnist_tar", max_steps=6, log_every=1, checkpoint_every=3, sample_every=0,
                           warmup_steps=0, report_flops=False, num_samples=4, sample_nrow=2)
    return config
