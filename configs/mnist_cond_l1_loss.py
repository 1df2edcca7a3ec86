"""The seed's toy/mnist_cond_l1_loss.yaml: mnist_cond with an l1 loss."""

from sgm_jax.configs import mnist_cond


def get_config():
    config = mnist_cond.get_config()
    config.model.params.loss_fn_config.params.loss_type = "l1"
    config.training.update(name="mnist_cond_l1_loss", num_samples=64, sample_nrow=8)
    return config
