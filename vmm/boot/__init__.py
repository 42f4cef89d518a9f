"""Putting a Linux kernel into guest RAM so a vCPU can jump to it in long mode.

`kernel.inspect` reads an image without side effects (config validation uses it);
`loader.load` writes the kernel, initrd, command line, boot_params, MP table, page
tables and GDT into guest memory and returns where the BSP starts.
"""
