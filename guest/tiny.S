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
 * Two more modes, chosen by the command line's first word (`wait` on both paths):
 *   wait ...   halt for ever after printing (HLT with interrupts off blocks the vCPU
 *              in the kernel without using the CPU): for tests that drive QMP.
 *   echo ...   copy bytes from the UART's receiver back to its transmitter until a
 *              '.' arrives, then reset: for tests of the serial input path.
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
    cmp $0x74696177, %eax       /* "wait" */
    je wait64
    cmp $0x6f686365, %eax       /* "echo" */
    je echo64
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

/* RSI: a NUL-terminated string; waits for THRE before each byte, as a driver does. */
puts64:
    lodsb
    test %al, %al
    jz 2f
    mov %al, %ah
    mov $UART_LSR, %dx
1:  in (%dx), %al
    test $LSR_THRE, %al
    jz 1b
    mov $UART, %dx
    mov %ah, %al
    out %al, (%dx)
    jmp puts64
2:  ret

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
    cmpl $0x74696177, (%esi)    /* "wait" */
    je wait32
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

puts32:
    lodsb
    test %al, %al
    jz 2f
    mov %al, %ah
    mov $UART_LSR, %dx
1:  in (%dx), %al
    test $LSR_THRE, %al
    jz 1b
    mov $UART, %dx
    mov %ah, %al
    out %al, (%dx)
    jmp puts32
2:  ret

    .section .rodata
banner64: .asciz "tiny guest: 64-bit entry, cmdline: "
banner32: .asciz "tiny guest: PVH entry, cmdline: "
newline:  .asciz "\n"

    /* XEN_ELFNOTE_PHYS32_ENTRY: where a PVH loader starts us in 32-bit mode. */
    .section .note.pvh, "a", @note
    .p2align 2
    .long 4                 /* name size */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
