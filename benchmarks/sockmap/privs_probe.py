"""Map + program made as root, then setuid(nobody): can the process still insert sockets?"""
import os, socket
import sockmap as sm
sh = sm.SockHash()
lst = socket.create_server(("127.0.0.1", 0)); bst = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(lst.getsockname()); front, _ = lst.accept()
back = socket.create_connection(bst.getsockname()); cont, _ = bst.accept()
os.setgroups([]); os.setgid(65534); os.setuid(65534)  # sockets made before, as the proxy would accept/dial later
try:
    sh.pair(front, back); cli.sendall(b"hi"); cont.settimeout(2); print("as nobody: insert ok, backend got", cont.recv(10))
except OSError as e:
    print("as nobody: insert failed:", e)
try:
    sm.SockHash(); print("as nobody: new map+prog ok")
except OSError as e:
    print("as nobody: new map+prog:", e.strerror.splitlines()[0])
