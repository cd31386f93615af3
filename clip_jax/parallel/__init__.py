"""The device mesh: mesh from config, logical-axis rules, shardings, FSDP inside the layers."""
