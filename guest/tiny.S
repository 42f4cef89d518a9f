/*
 * The tiny test guest: prints one line on the 8250 UART at 0x3f8 and ends the VM,
 * with interrupts off throughout (a guest on a PVM host must never take one).
 *
 * Two ways in, the same work:
 *   start64    the ELF entry: 64-bit mode, RSI = boot_params (our VMM, like any
 *              VMM that boots a vmlinux directly); prints the command line it finds
 *              through boot_params.hdr.cmd_line_ptr.
 *   pvh_start  the PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode,
 *              EBX = hvm_start_info (QEMU's -kernel on an ELF with this note); prints
 *              the command line from start_info.cmdline_paddr.
 * Then it writes to isa-debug-exit (port 0x501; QEMU exits, our VMM ignores it) and
 * asks the i8042 for a reset (port 0x64, 0xfe), which ends the VM in our VMM.
 *
 * Three more modes, chosen by the command line's first word (`wait` and `watch` on
 * both paths, `echo` on the 64-bit one):
 *   wait ...   halt for ever after printing (HLT with interrupts off blocks the vCPU
 *              in the kernel without using the CPU): for tests that drive QMP.
 *   echo ...   copy bytes from the UART's receiver back to its transmitter until a
 *              '.' arrives, then reset: for tests of the serial input path.
 *   watch ...  poll disk slot 1 for ever, for hot-plug tests and bench/hotplug.py:
 *              each turn of the loop reads the low 32 bits of the slot's virtio-blk
 *              capacity (config space, 0xD000_1100; an empty slot reads 0) and
 *              prints `+` when it goes from 0 to non-zero, `-` when it goes back to
 *              0; every WATCH_TICK turns it prints `.`, a progress tick: each turn
 *              is an MMIO exit to the VMM plus ten emulated instructions, ~15 us on
 *              this project's PVM host with our VMM (measured), so 6-7 ticks a
 *              second (about 10 under QEMU, whose microvm has nothing at that address:
 *              it reads 0, ticks only). No driver: the slot is never reset nor set
 *              DRIVER_OK, so no configuration-change interrupt is raised.
 *              The 64-bit path starts with the VMM's page tables, which map only the
 *              first 1 GiB (vmm/boot/longmode.py); unless the PDPT's fourth entry is
 *              present already, it maps 3-4 GiB itself there: a PD of 2 MiB pages,
 *              identity, uncached (pd_high below, in the image's .bss). The PVH path
 *              runs with paging off and reads the address as it is.
 */
#define UART        0x3f8
#define UART_LSR    0x3fd
#define LSR_THRE    0x20
#define LSR_DR      0x01
#define DEBUG_EXIT  0x501
#define I8042_CMD   0x64
#define I8042_RESET 0xfe
#define BP_CMD_LINE_PTR   0x228
#define PVH_CMDLINE_PADDR 24
#define WORD_WAIT   0x74696177      /* "wait", the first 4 bytes as a little-endian dword */
#define WORD_ECHO   0x6f686365      /* "echo" */
#define WORD_WATC   0x63746177      /* "watc", then 'h' */
#define SLOT1_CAPACITY 0xD0001100   /* disk slot 1's window + 0x100: config, capacity */
#define WATCH_TICK  10000           /* polls between two '.' ticks */
#define PTE_P_RW    0x03
#define PTE_PWT_PCD 0x18
#define PTE_PS      0x80
#define HIGH_GIB    0xC0000000      /* the 1 GiB that the PDPT's entry 3 maps */

    .section .text
    .code64
    .globl start64
start64:
    cli
    mov %rsi, %rbx
    lea banner64(%rip), %rsi
    call puts64
    mov BP_CMD_LINE_PTR(%rbx), %esi
    test %esi, %esi
    jz 1f
    call puts64
1:  lea newline(%rip), %rsi
    call puts64
    mov BP_CMD_LINE_PTR(%rbx), %esi
    test %esi, %esi
    jz finish64
    mov (%rsi), %eax
    cmp $WORD_WAIT, %eax
    je wait64
    cmp $WORD_ECHO, %eax
    je echo64
    cmp $WORD_WATC, %eax
    jne finish64
    cmpb $'h', 4(%rsi)
    je watch64
finish64:
    mov $DEBUG_EXIT, %dx
    xor %al, %al
    out %al, (%dx)
    mov $I8042_CMD, %dx
    mov $I8042_RESET, %al
    out %al, (%dx)
2:  jmp 2b

wait64:
    hlt
    jmp wait64

echo64:
    mov $UART_LSR, %dx
1:  in (%dx), %al
    test $LSR_DR, %al
    jz 1b
    mov $UART, %dx
    in (%dx), %al
    out %al, (%dx)
    cmp $'.', %al
    jne echo64
    jmp finish64

watch64:
    /* Map 3-4 GiB unless it is mapped: PDPT[3] -> pd_high, 512 identity 2 MiB pages. */
    mov %cr3, %rax
    mov $0x000ffffffffff000, %rcx   /* an entry's address bits */
    and %rcx, %rax
    mov (%rax), %rax                /* PML4[0]: the PDPT of the low 512 GiB */
    and %rcx, %rax
    testb $1, 24(%rax)
    jnz 2f
    lea pd_high(%rip), %rdi
    mov $HIGH_GIB | PTE_PS | PTE_PWT_PCD | PTE_P_RW, %edx
    mov $512, %ecx
1:  mov %rdx, (%rdi)
    add $8, %rdi
    add $0x200000, %rdx
    loop 1b
    lea pd_high(%rip), %rdi
    or $PTE_P_RW, %rdi
    mov %rdi, 24(%rax)
    mov %cr3, %rax                  /* flush the TLB */
    mov %rax, %cr3
2:  mov $SLOT1_CAPACITY, %edi
    xor %ebx, %ebx                  /* BL: 1 while the slot's capacity is non-zero */
3:  mov $WATCH_TICK, %ecx
4:  mov (%rdi), %eax                /* the MMIO read: one exit to the VMM */
    test %eax, %eax
    setnz %al
    cmp %bl, %al
    je 5f
    mov %al, %bl
    mov $'-', %ah
    test %al, %al
    jz 6f
    mov $'+', %ah
6:  call putc64
5:  dec %ecx
    jnz 4b
    mov $'.', %ah
    call putc64
    jmp 3b

/* RSI: a NUL-terminated string; waits for THRE before each byte, as a driver does. */
puts64:
    lodsb
    test %al, %al
    jz 2f
    mov %al, %ah
    call putc64
    jmp puts64
2:  ret

/* AH: one byte to send once THRE is set. Clobbers AL and DX. */
putc64:
    mov $UART_LSR, %dx
1:  in (%dx), %al
    test $LSR_THRE, %al
    jz 1b
    mov $UART, %dx
    mov %ah, %al
    out %al, (%dx)
    ret

    .code32
    .globl pvh_start
pvh_start:
    cli
    mov $0x80000, %esp
    mov $banner32, %esi
    call puts32
    mov PVH_CMDLINE_PADDR(%ebx), %esi
    test %esi, %esi
    jz 1f
    call puts32
1:  mov $newline, %esi
    call puts32
    mov PVH_CMDLINE_PADDR(%ebx), %esi
    test %esi, %esi
    jz 3f
    cmpl $WORD_WAIT, (%esi)
    je wait32
    cmpl $WORD_WATC, (%esi)
    jne 3f
    cmpb $'h', 4(%esi)
    je watch32
3:  mov $DEBUG_EXIT, %dx
    xor %al, %al
    out %al, (%dx)
    mov $I8042_CMD, %dx
    mov $I8042_RESET, %al
    out %al, (%dx)
2:  jmp 2b

wait32:
    hlt
    jmp wait32

/* As watch64, with paging off: the physical address is read as it is. */
watch32:
    mov $SLOT1_CAPACITY, %edi
    xor %ebx, %ebx
3:  mov $WATCH_TICK, %ecx
4:  mov (%edi), %eax
    test %eax, %eax
    setnz %al
    cmp %bl, %al
    je 5f
    mov %al, %bl
    mov $'-', %ah
    test %al, %al
    jz 6f
    mov $'+', %ah
6:  call putc32
5:  dec %ecx
    jnz 4b
    mov $'.', %ah
    call putc32
    jmp 3b

puts32:
    lodsb
    test %al, %al
    jz 2f
    mov %al, %ah
    call putc32
    jmp puts32
2:  ret

putc32:
    mov $UART_LSR, %dx
1:  in (%dx), %al
    test $LSR_THRE, %al
    jz 1b
    mov $UART, %dx
    mov %ah, %al
    out %al, (%dx)
    ret

    .section .rodata
banner64: .asciz "tiny guest: 64-bit entry, cmdline: "
banner32: .asciz "tiny guest: PVH entry, cmdline: "
newline:  .asciz "\n"

    /* watch64's page directory for 3-4 GiB (filled before use: no zeroing needed). */
    .section .bss, "aw", @nobits
    .p2align 12
pd_high: .skip 4096

    /* XEN_ELFNOTE_PHYS32_ENTRY: where a PVH loader starts us in 32-bit mode. */
    .section .note.pvh, "a", @note
    .p2align 2
    .long 4                 /* name size */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
