"""The seed's toy/mnist.yaml: unconditional MNIST (no conditioner, no CFG), 10 epochs."""

from sgm_jax.configs import mnist_cond


def get_config():
    config = mnist_cond.get_config()
    p = config.model.params
    p.network_config = mnist_cond.unet(num_classes=None, adm_in_channels=None)
    p.conditioner_config = {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": []}}
    del p.sampler_config.params.guider_config
    config.training = mnist_cond.training(name="mnist", max_epochs=10, num_samples=64, sample_nrow=8)
    return config
