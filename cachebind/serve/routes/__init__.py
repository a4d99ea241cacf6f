"""The HTTP routes, one ``APIRouter`` module per resource; ``cachebind.serve.app`` includes them.

ops: probes and metrics · embed: F_M · search: nearest rows · images: thumbnails ·
enhance: F~_M · generate: LLaMA with F~_M injected · admin: the served index and its reload.
"""
