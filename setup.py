"""The optional C kernels of calibration (everything else is in pyproject.toml).

Built when a C compiler is there; without one the install still succeeds and observers use
numpy, which gives the same bytes, slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("edgequant.calibration._kernels", ["src/edgequant/calibration/_kernels.c"],
                             optional=True)])
