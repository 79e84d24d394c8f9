"""Packaging for virtproxy.

``twisted.plugins`` is listed as a package so the twistd plugin
(``twisted/plugins/virtproxy_plugin.py``) and virtproxy's endpoint parsers are
installed into Twisted's plugin directory.  The repository deliberately has no
``twisted/__init__.py`` or ``twisted/plugins/__init__.py``: installing either
would replace Twisted's own and break it.  For the same reason install with
``pip install .``, not ``-e``: an editable install of this flat layout does not
put the plugin where Twisted looks.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "virtproxy" / "__init__.py").read_text(), re.M
)
assert VERSION is not None, "virtproxy/__init__.py must set __version__"

setup(
    name="virtproxy",
    version=VERSION.group(1),
    description="Proxy and multiplex socket streams over one VM host/guest data channel",
    long_description=(HERE / "README.rst").read_text() if (HERE / "README.rst").exists() else "",
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=["virtproxy", "twisted.plugins"],
    # build_py copies only the .py modules found there: no __init__.py exists
    # to copy, and no stale dropin.cache is shipped.
    install_requires=["twisted>=26.1", "pyserial>=3.5,<4", "prometheus-client>=0.20"],
    extras_require={
        "test": [
            "pytest>=9",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            # Linters pinned: a new release may add rules or change inference.
            "mypy==2.4.1",
            "mypy-zope==1.0.17",
            "ruff==0.17.6",
        ],
        # Coverage-guided fuzzing (fuzz/README.rst); binary wheels only.
        "fuzz": ["atheris>=2.3"],
    },
    entry_points={"console_scripts": ["virtproxy = virtproxy.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
