"""DisAug CLR: distribution-augmented contrastive learning (Sohn et al. 2021).

Contrastive learning whose training distribution is extended with the 90,
180 and 270-degree rotated copies of every normal image; each copy is a
separate instance, so a rotated copy is a negative rather than a positive of
its source (the reference's distaug_type='rot'). This keeps
the representation from spreading the normal data uniformly over the sphere.
The rotated copies come from the input pipeline (`data.rotation_distaug`);
the classifiers are fitted on the unrotated normal images only.
"""

from jax_oneclass.errors import ConfigError
from jax_oneclass.methods.two_stage import clr


class Method(clr.Method):
  """CLR trained on the rotation-augmented distribution."""

  def __init__(self, config, info):
    if not config.data.get("rotation_distaug"):
      raise ConfigError(
        "DisAug CLR trains on rotated copies as extra distributions: set "
        "config.data.rotation_distaug=True (or use method 'clr')."
      )
    super().__init__(config, info)
