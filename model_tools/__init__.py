"""Tools that create, train and evaluate the model folder this repo ships.

Nothing here is imported by the endpoint at serving time.
"""
