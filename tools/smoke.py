import numpy as np, ctypes, pymetalnn as pm, time
dev = pm.device()
lib = dev.library("tools/smoke.metal")
print(lib.names, [lib.kernel(n).uses_fibers for n in lib.names])
class P(ctypes.Structure): _fields_=[("n",ctypes.c_uint32),("scale",ctypes.c_float)]
x = np.arange(10, dtype=np.float32); b = dev.buffer(x)
lib.kernel("scale_float")(10, b, P(10, 1.5)); print(b.numpy(np.float32))
n=1<<20; x=np.random.rand(n).astype(np.float32); xb=dev.buffer(x); out=dev.buffer(4)
t=time.time(); lib.kernel("red")(n, xb, out, n); dev.synchronize(); print("red", time.time()-t, out.numpy(np.float32), x.sum())
