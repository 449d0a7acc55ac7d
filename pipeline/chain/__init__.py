"""The chain: a generation trained (and its outputs written) into a project root, and the sweep of whole
chains over seeds. The stages and `bancache sweep` parse params and call these."""
