// Linked into the native CPU kernel on Linux x86-64 with glibc, so that the
// wheel needs nothing newer from the system than the manylinux_2_27 policy
// allows (setup.py links libstdc++ statically; see the comments there).
//
// 1. libstdc++'s headers (GCC 12 and newer) read `__libc_single_threaded`,
//    which glibc exports only from GLIBC_2.32. A hidden definition here
//    satisfies those references inside the library, so the dynamic symbol is
//    never imported. 0 means "maybe multi-threaded": libstdc++ then always
//    takes its thread-safe (atomic) paths, which is correct everywhere.
// 2. glibc 2.34 moved `pthread_once` into libc under the new version
//    GLIBC_2.34. The linker is told to send every reference to
//    `__wrap_pthread_once` (-Wl,--wrap=pthread_once), which calls the
//    GLIBC_2.2.5 version, present in every x86-64 glibc.
#include <pthread.h>

extern "C" {

__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

int lovasz_jax_pthread_once_v2_2_5(pthread_once_t* once, void (*init)(void));
__asm__(".symver lovasz_jax_pthread_once_v2_2_5, pthread_once@GLIBC_2.2.5");

__attribute__((visibility("hidden"))) int __wrap_pthread_once(
    pthread_once_t* once, void (*init)(void)) {
  return lovasz_jax_pthread_once_v2_2_5(once, init);
}

}  // extern "C"
