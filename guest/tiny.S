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
 * Four more modes, chosen by the command line's first word (`wait` and `watch` on
 * both paths, `echo` and `hostile` on the 64-bit one):
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
 *   hostile ...  misprogram every virtio-mmio slot window (0..10, occupied or not) in
 *              turn, HOSTILE_ROUNDS times in all, then print `hostile: done` and
 *              reset: for the bounded-logging test. Round r takes slot r % 11 and
 *              does thing (r / 11) % 4 to it after a reset and ACKNOWLEDGE|DRIVER:
 *              0 FEATURES_OK without VERSION_1 (refused), 1 a ready queue of size 3,
 *              2 a descriptor table at 1 TiB (outside RAM), 3 a valid ring whose one
 *              available entry names head 0xffff (a broken ring, kicked), each of
 *              1..3 then setting DRIVER_OK. The queue is 1 when the slot has one
 *              (a NIC's, console's or vsock's transmit queue), else 0. Mapped as
 *              `watch` maps the slots.
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
#define WORD_HOST   0x74736f68      /* "host", then "ile" */
#define MMIO_SLOTS  0xD0000000      /* slot s's window: MMIO_SLOTS + s * 0x1000 */
#define SLOT_COUNT  11
#define HOSTILE_ROUNDS 22000        /* 500 times each of the 11 slots x 4 things */
#define R_FEATURES_SEL 0x024
#define R_FEATURES  0x020
#define R_QUEUE_SEL 0x030
#define R_QUEUE_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_READY     0x044
#define R_NOTIFY    0x050
#define R_STATUS    0x070
#define R_DESC      0x080           /* low; high at +4 */
#define R_AVAIL     0x090
#define R_USED      0x0A0
#define RING_DESC   0x300000        /* the hostile ring, in the first 1 GiB */
#define RING_AVAIL  0x301000
#define RING_USED   0x302000

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
    cmp $WORD_HOST, %eax
    je hostile64
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
    call map_high64
    mov $SLOT1_CAPACITY, %edi
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

/* Map 3-4 GiB (the slots' windows) unless it is mapped. Clobbers RAX, RCX, RDX, RDI. */
map_high64:
    /* PDPT[3] -> pd_high, 512 identity 2 MiB pages. */
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
2:  ret

hostile64:
    call map_high64
    movl $0x00010000, RING_AVAIL    /* flags 0, idx 1 */
    movw $0xffff, RING_AVAIL + 4    /* ring[0]: a head past the ring's end */
    xor %r12d, %r12d                /* the round */
1:  mov %r12d, %eax
    xor %edx, %edx
    mov $SLOT_COUNT, %ecx
    div %ecx                        /* EAX: r / 11, EDX: the slot */
    shl $12, %edx
    mov $MMIO_SLOTS, %edi
    add %edx, %edi
    and $3, %eax                    /* the thing to do */
    movl $0, R_STATUS(%rdi)
    movl $3, R_STATUS(%rdi)
    test %eax, %eax
    jz 4f
    movl $1, R_FEATURES_SEL(%rdi)
    movl $1, R_FEATURES(%rdi)       /* VERSION_1 */
    movl $1, R_QUEUE_SEL(%rdi)
    mov $1, %r13d
    cmpl $0, R_QUEUE_MAX(%rdi)
    jnz 2f
    movl $0, R_QUEUE_SEL(%rdi)
    xor %r13d, %r13d
2:  movl $8, R_QUEUE_NUM(%rdi)
    movl $RING_DESC, R_DESC(%rdi)
    movl $0, R_DESC + 4(%rdi)
    movl $RING_AVAIL, R_AVAIL(%rdi)
    movl $0, R_AVAIL + 4(%rdi)
    movl $RING_USED, R_USED(%rdi)
    movl $0, R_USED + 4(%rdi)
    cmp $1, %eax
    jne 3f
    movl $3, R_QUEUE_NUM(%rdi)
3:  cmp $2, %eax
    jne 5f
    movl $0x100, R_DESC + 4(%rdi)
5:  movl $1, R_READY(%rdi)
    movl $0xb, R_STATUS(%rdi)
    movl $0xf, R_STATUS(%rdi)
    mov %r13d, R_NOTIFY(%rdi)
    jmp 6f
4:  movl $0xb, R_STATUS(%rdi)       /* FEATURES_OK without VERSION_1 */
6:  inc %r12d
    cmp $HOSTILE_ROUNDS, %r12d
    jb 1b
    lea hostile_done(%rip), %rsi
    call puts64
    jmp finish64

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
hostile_done: .asciz "hostile: done\n"

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
