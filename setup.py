from setuptools import find_packages, setup

POSTGRESQL = ["psycopg[binary]>=3.1", "psycopg-pool>=3.2"]

setup(
    name="greyd",
    version="0.1.0",
    description="A greylisting SMTP proxy for small mail hosts",
    packages=find_packages(include=["greyd", "greyd.*"]),
    # The sample config and the unit, cron and logrotate templates `greyd setup`
    # installs: links to etc/ in a checkout, copied into the package when built.
    package_data={"greyd": ["data/*"]},
    python_requires=">=3.11",
    install_requires=[
        "dnspython>=2.4",
        "sqlite-utils>=3.35",
        "click>=8.1",
        "cryptography>=42",
        "idna>=3.7",
        "pyspf>=2.0.14",            # SPF (RFC 7208) for SPF-keyed triplets
        "publicsuffixlist>=1.0",    # registered domains for the "name" client key
        "prometheus_client>=0.17",  # [metrics]: the Prometheus text format at /metrics
    ],
    extras_require={
        # [database] url: several greyd hosts share one greylist in PostgreSQL.
        "postgresql": POSTGRESQL,
        "test": [
            *POSTGRESQL,
            "pytest>=7",
            "pytest-timeout>=2.1",
            "aiosmtpd>=1.4",
            "hypothesis>=6",
            "trustme>=1.1",
            "wheel",        # the package test builds a wheel without build isolation
        ],
    },
    entry_points={"console_scripts": ["greyd = greyd.cli:main"]},
)
