"""Conversion between the -PT (transformers) and -Paddle (ERNIEKit / FastDeploy) ERNIE 4.5 layouts.
Needs numpy and safetensors only: no paddle, no torch."""
