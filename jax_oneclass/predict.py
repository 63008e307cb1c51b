"""`python -m jax_oneclass.predict ...`: the CLI's --mode=predict.

  python -m jax_oneclass.predict --workdir=/tmp/run --input='photos/*.jpg' \
      --output=/tmp/predictions

See `jax_oneclass.detector.predict_folder` for what it writes.
"""


def main():
  """Runs `python -m jax_oneclass.main --mode=predict` with these flags."""
  from jax_oneclass import main as main_lib  # pylint: disable=g-import-not-at-top

  main_lib.run(["--mode=predict"])


if __name__ == "__main__":
  main()
