"""Two-stage deep one-class classification (Sohn et al. 2021): RotNet, CLR,
DisAug CLR, then one-class classifiers on the frozen features."""
