"""The runtime: Stage (one model slice), transports, the executor and the multi-process launcher."""
