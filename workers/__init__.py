"""Code that runs inside one Ray Train worker or Tune trial: data, search and evaluation loops."""
