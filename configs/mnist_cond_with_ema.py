"""The seed's toy/mnist_cond_with_ema.yaml: mnist_cond with an EMA of every trainable parameter."""

from sgm_jax.configs import mnist_cond


def get_config():
    config = mnist_cond.get_config()
    config.model.params.use_ema = True
    config.training.update(name="mnist_cond_with_ema", num_samples=64, sample_nrow=8)
    return config
