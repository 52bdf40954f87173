# pyproxy-wait for x86-64 Linux: the engine's waiter as a few hundred bytes of machine code,
# statically linked, no libc, no data segment: what it costs per published port is its stack
# page and page tables (~8-12 KiB of PSS) where a shell costs 64-113 KiB (proxy/handover.py).
#
# It does exactly what the shell program of proxy/handover.py does (WAITER_TRAP, WAITER_READY,
# WAITER_LOOP, resume_command), with its instructions in argv instead of a script:
#
#   argv[0]   the title `ps` shows (pyproxy-wait <mapping>...): not read here
#   argv[1]   "ready": write "0\n" on fd 3 once the stop signals are handled, then close it;
#             "-": fd 3 is not ours (a re-attach: it may be a held socket). Exactly one
#             of the two: any other argv[1] is pyproxy-door's (see below).
#   argv[2..] the command that re-attaches, exec'd once the engine connection ends: argv[2]
#             is both the program's path and its argv[0], as in the shell's `exec 'python'
#             ...`; absent: exit 1 then.
#
# fd 0 and fd 1 are the engine connection, fd 2 stderr, the held sockets wherever they are:
# nothing here opens, closes or moves any of them but fd 3 (when "ready") and fds 0 and 1
# (to /dev/null, just before the exec, as the shell's `</dev/null >/dev/null`).
#
# Signals. SIGINT and SIGTERM are blocked by the very first system call, so neither can end
# this process by its default action (pyproxy blocks them before its execve too, so there is
# no instant at all in which they could: a blocked signal stays pending across an exec).
# Their handler does the whole stop itself and never returns: "stop\n" to the engine, its
# answer read up to a newline or EOF, exit 0. While it runs both are blocked (sa_mask), so a
# second signal changes nothing. Every other disposition stays as inherited (pyproxy's
# CPython ignores SIGPIPE, and an exec keeps what is ignored), and the mask is given back
# unblocked before any execve, since a mask survives an exec.
#
# The same binary is pyproxy-door (installed as bin/pyproxy-door): with any other argv[1],
# _start hands over to door_main (door_x86_64.c) once the stop signals are blocked.
#
# Build: proxy/waiter/build.sh (as + gcc + ld, deterministic); tests/test_waiter.py checks
# that the committed binary is what this source builds to.

    .set SYS_read, 0
    .set SYS_write, 1
    .set SYS_open, 2
    .set SYS_close, 3
    .set SYS_rt_sigaction, 13
    .set SYS_rt_sigprocmask, 14
    .set SYS_rt_sigreturn, 15
    .set SYS_dup2, 33
    .set SYS_sendto, 44
    .set SYS_execve, 59
    .set SYS_exit_group, 231

    .set SIGINT, 2
    .set SIGTERM, 15
    .set STOP_SIGNALS, (1 << (SIGINT - 1)) | (1 << (SIGTERM - 1))  # a kernel sigset_t
    .set SIG_BLOCK, 0
    .set SIG_UNBLOCK, 1
    .set SIGSET_SIZE, 8
    .set SA_RESTORER, 0x04000000
    .set EINTR, 4
    .set O_RDWR, 2
    .set MSG_NOSIGNAL, 0x4000
    .set STATUS_FD, 3
    .set BUFFER, 256            # what one read takes off the connection; the rest comes next

    .text
    .globl _start
_start:
    # Block the stop signals before anything else: from here a SIGINT/SIGTERM waits, pending,
    # until its handler is in place.
    mov     $SYS_rt_sigprocmask, %eax
    mov     $SIG_BLOCK, %edi
    lea     stop_signals(%rip), %rsi
    xor     %edx, %edx
    mov     $SIGSET_SIZE, %r10d
    syscall

    # argc, argv and envp as the kernel left them on the stack, in registers that system
    # calls keep (they clobber rax, rcx and r11 only), for the exec at the end.
    mov     (%rsp), %r12                # argc
    lea     8(%rsp), %r13               # argv
    lea     16(%rsp,%r12,8), %r14       # envp: past argv's terminating NULL

    # argv[1] exactly "ready" or "-": the waiter, below. Anything else (or no argv[1]): the
    # front door (door_x86_64.c), with the stop signals still blocked; it never returns.
    # The loads may read past a short argv[1] into the next strings on the stack, never past
    # its end (the program's path and a NULL word close it).
    cmp     $2, %r12
    jb      door
    mov     8(%r13), %rax               # argv[1]
    cmpw    $'-', (%rax)                # "-\0"
    je      waiter
    cmpl    $0x64616572, (%rax)         # "read"
    jne     door
    cmpw    $'y', 4(%rax)               # "y\0"
    je      waiter
door:
    mov     %r12, %rdi                  # door_main(argc, argv, envp), %rsp as the kernel left
    mov     %r13, %rsi                  # it: 16-byte aligned before the call, as the ABI wants
    mov     %r14, %rdx
    call    door_main

waiter:
    sub     $BUFFER, %rsp               # the read buffer, below what the kernel put there

    # The handler for both stop signals (the trap of the shell program).
    mov     $SYS_rt_sigaction, %eax
    mov     $SIGINT, %edi
    lea     stop_action(%rip), %rsi
    xor     %edx, %edx
    mov     $SIGSET_SIZE, %r10d
    syscall
    mov     $SYS_rt_sigaction, %eax
    mov     $SIGTERM, %edi
    lea     stop_action(%rip), %rsi
    xor     %edx, %edx
    mov     $SIGSET_SIZE, %r10d
    syscall

    # "0\n" on fd 3 if argv[1] says so: one write, as dockerd reads it with one read; and
    # only now, since a stop signal is answered from here on (it waits pending until the
    # unblock below, then runs the handler). Then close fd 3, so that dockerd sees EOF.
    cmp     $2, %r12
    jb      unblock
    mov     8(%r13), %rax               # argv[1]
    cmpb    $'r', (%rax)
    jne     unblock
ready:
    mov     $SYS_write, %eax
    mov     $STATUS_FD, %edi
    lea     ready_line(%rip), %rsi
    mov     $2, %edx
    syscall
    cmp     $-EINTR, %rax               # no handler can interrupt it now; kept for safety
    je      ready
    mov     $SYS_close, %eax
    mov     $STATUS_FD, %edi
    syscall                             # an error here leaves nothing to do differently

unblock:
    mov     $SYS_rt_sigprocmask, %eax
    mov     $SIG_UNBLOCK, %edi
    lea     stop_signals(%rip), %rsi
    xor     %edx, %edx
    mov     $SIGSET_SIZE, %r10d
    syscall

    # Wait: read the engine connection and discard what comes, until EOF or an error (the
    # engine is gone). A stop signal never comes back here: its handler exits.
wait:
    xor     %eax, %eax                  # SYS_read
    xor     %edi, %edi                  # fd 0
    mov     %rsp, %rsi
    mov     $BUFFER, %edx
    syscall
    test    %rax, %rax
    jg      wait                        # junk, or a line we have no use for
    cmp     $-EINTR, %rax
    je      wait

    # The engine is gone. With a command to re-attach (argv[2]), exec it in this process
    # with fds 0 and 1 on /dev/null; with none, there is nothing to keep: exit 1.
    cmp     $3, %r12
    jb      give_up
    mov     $SYS_open, %eax
    lea     dev_null(%rip), %rdi
    mov     $O_RDWR, %esi
    xor     %edx, %edx
    syscall
    test    %rax, %rax
    js      give_up                     # as the shell, whose redirection failed
    mov     %rax, %rbx                  # the lowest free fd: 0 and 1 are open, so above them
    mov     $SYS_dup2, %eax
    mov     %rbx, %rdi
    xor     %esi, %esi
    syscall
    mov     $SYS_dup2, %eax
    mov     %rbx, %rdi
    mov     $1, %esi
    syscall
    mov     $SYS_close, %eax            # no stray copy of /dev/null for the program
    mov     %rbx, %rdi
    syscall
    mov     $SYS_execve, %eax
    mov     16(%r13), %rdi              # argv[2]: the program
    lea     16(%r13), %rsi              # its argv: argv[2], argv[3]... up to our NULL
    mov     %r14, %rdx                  # our environment, as it came
    syscall
give_up:                                # no command, or it could not be run
    mov     $SYS_exit_group, %eax
    mov     $1, %edi
    syscall

    # The stop: SIGINT or SIGTERM, with both blocked while it runs. Ask the engine to release
    # the port ("stop\n"), wait for its answer ("ok\n") or for EOF, and exit 0: the port is
    # free by then. MSG_NOSIGNAL: an engine gone meanwhile is no SIGPIPE, whatever its
    # disposition; fd 1 not a socket (already /dev/null, on the way to the exec) just fails.
on_stop:
    sub     $64, %rsp                   # the answer's buffer, below the signal frame
send_stop:
    mov     $SYS_sendto, %eax
    mov     $1, %edi
    lea     stop_line(%rip), %rsi
    mov     $5, %edx
    mov     $MSG_NOSIGNAL, %r10d
    xor     %r8d, %r8d
    xor     %r9d, %r9d
    syscall
    cmp     $-EINTR, %rax
    je      send_stop
read_answer:
    xor     %eax, %eax                  # SYS_read
    xor     %edi, %edi
    mov     %rsp, %rsi
    mov     $64, %edx
    syscall
    cmp     $-EINTR, %rax
    je      read_answer
    test    %rax, %rax
    jle     stopped                     # EOF or an error: the engine let go of us anyway
    xor     %ecx, %ecx
find_newline:
    cmpb    $'\n', (%rsp,%rcx)
    je      stopped
    inc     %rcx
    cmp     %rax, %rcx
    jb      find_newline
    jmp     read_answer                 # no end of line yet
stopped:
    mov     $SYS_exit_group, %eax
    xor     %edi, %edi
    syscall

    # The kernel returns from a handler through this (x86-64 requires SA_RESTORER); ours
    # never returns, but a handler must have one to be delivered at all.
restore:
    mov     $SYS_rt_sigreturn, %eax
    syscall

    .section .rodata
    .balign 8
stop_action:                            # struct sigaction as the kernel reads it
    .quad   on_stop                     # sa_handler
    .quad   SA_RESTORER                 # sa_flags
    .quad   restore                     # sa_restorer
    .quad   STOP_SIGNALS                # sa_mask: both blocked while the handler runs
stop_signals:
    .quad   STOP_SIGNALS
ready_line:
    .ascii  "0\n"
stop_line:
    .ascii  "stop\n"
dev_null:
    .asciz  "/dev/null"

    # No executable stack (without this note the kernel would make it executable).
    .section .note.GNU-stack, "", @progbits
