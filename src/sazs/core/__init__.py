"""What every sazs package shares and nothing else: devices, files, console, fault points.

``sazs.core`` imports no other sazs package; all the others may import it.
"""
