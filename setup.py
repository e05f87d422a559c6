"""Only the optional native part; everything else is in pyproject.toml.

`ps3.data._jpegregion` decodes a rectangle of a JPEG with libjpeg-turbo (see its source).
It needs libjpeg's headers (Debian: libjpeg62-turbo-dev, which `make install` installs);
without them the build is skipped and `ps3.data.decode` falls back to whole-image decodes.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ps3.data._jpegregion", ["ps3/data/_jpegregion.c"], libraries=["jpeg"],
                             extra_compile_args=["-O2"], optional=True)])
