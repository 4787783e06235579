#!/bin/bash
# print last missing module for the import target
/tmp/lzvenv/bin/python -c "${1:-import lzero.model.unizero_world_models.world_model; import lzero.model.unizero_model}" 2>&1 | grep -E "Error" | tail -2
