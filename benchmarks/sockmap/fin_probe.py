"""What does a FIN do on a sockmap'd pair? (no relay: the proxy's two sockets held here)"""
import select, socket, time
import sockmap as sm

sh = sm.SockHash()
lst = socket.create_server(("127.0.0.1", 0)); bst = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(lst.getsockname()); front, _ = lst.accept()
back = socket.create_connection(bst.getsockname()); cont, _ = bst.accept()
sh.pair(front, back)
for s in (cli, cont, front, back): s.settimeout(2)
cli.sendall(b"a" * 7000)
print("backend got", len(cont.recv(100000)))
cli.shutdown(socket.SHUT_WR)
time.sleep(0.2)
ep = select.poll()
for s in (front, back): ep.register(s, select.POLLIN | select.POLLRDHUP | select.POLLERR | select.POLLHUP)
print("poll (front, back):", [(s.fileno() == front.fileno() and 'front' or 'back', hex(e)) for s, e in [(next(x for x in (front, back) if x.fileno() == fd), ev) for fd, ev in ep.poll(0)]])
print("SO_ERROR front", front.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "back", back.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
cont.setblocking(False)
try:
    print("backend recv after client FIN:", cont.recv(10))
except BlockingIOError:
    print("backend recv after client FIN: nothing (FIN not passed on)")
front.setblocking(False)
try:
    print("proxy recv on front:", front.recv(10))
except BlockingIOError:
    print("proxy recv on front: EAGAIN")
try:
    cont.sendall(b"late" * 1000); time.sleep(0.2)
    cli.setblocking(False)
    print("client got after its FIN:", len(cli.recv(100000)))
except OSError as e:
    print("reverse direction after FIN:", e)
print("SO_ERROR front", front.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "back", back.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
