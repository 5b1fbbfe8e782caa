"""Placing a topology's servers on an existing Ray cluster (``--ray-address``).

No pytest here, and no Ray import at module load: Ray is an optional extra
(``pip install 'pytest-mm27[ray]'``) imported by :mod:`.connect` only when a
run asks for a cluster. :mod:`.placement` decides, from the cluster's nodes,
which node each server goes to (pure, testable without Ray);
:mod:`.launcher` boots a launch plan there with one placement group and one
actor per server; :mod:`.keeper` is the small supervisor each actor starts,
so a server never outlives its actor or its node.
"""
