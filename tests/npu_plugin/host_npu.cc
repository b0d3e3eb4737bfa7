// A Paddle custom-device runtime that calls itself "npu" but keeps every tensor in host memory.
//
// It registers no kernels: Paddle runs each op through its CPU fallback, so a whole dygraph model
// runs on a "npu:i" place and takes Paddle's npu-named code paths without Ascend hardware.
// Written against paddle/phi/backends/device_ext.h of the installed wheel; see tests/test_npu.py.

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "paddle/phi/backends/device_ext.h"

namespace {

constexpr size_t kDeviceCount = 2;
thread_local int current_device = 0;

// Streams and events are never dereferenced by Paddle; any distinct non-null handle will do.
C_Stream_st* const kStream = reinterpret_cast<C_Stream_st*>(0x1);
C_Event_st* const kEvent = reinterpret_cast<C_Event_st*>(0x1);

C_Status Ok(const C_Device) { return C_SUCCESS; }

C_Status SetDevice(const C_Device device) {
  if (device->id < 0 || static_cast<size_t>(device->id) >= kDeviceCount) return C_ERROR;
  current_device = device->id;
  return C_SUCCESS;
}

C_Status GetDevice(const C_Device device) {
  device->id = current_device;
  return C_SUCCESS;
}

C_Status CreateStream(const C_Device, C_Stream* stream) {
  *stream = kStream;
  return C_SUCCESS;
}

C_Status StreamOp(const C_Device, C_Stream) { return C_SUCCESS; }

C_Status StreamAddCallback(const C_Device device, C_Stream stream, C_Callback callback,
                           void* user_data) {
  // Work is finished when it is enqueued, so the callback can run right away.
  C_Status status = C_SUCCESS;
  callback(device, stream, user_data, &status);
  return status;
}

C_Status CreateEvent(const C_Device, C_Event* event) {
  *event = kEvent;
  return C_SUCCESS;
}

C_Status RecordEvent(const C_Device, C_Stream, C_Event) { return C_SUCCESS; }

C_Status EventOp(const C_Device, C_Event) { return C_SUCCESS; }

C_Status StreamWaitEvent(const C_Device, C_Stream, C_Event) { return C_SUCCESS; }

C_Status Allocate(const C_Device, void** ptr, size_t size) {
  *ptr = std::malloc(size);
  return *ptr ? C_SUCCESS : C_FAILED;
}

C_Status Deallocate(const C_Device, void* ptr, size_t) {
  std::free(ptr);
  return C_SUCCESS;
}

C_Status MemorySet(const C_Device, void* ptr, unsigned char value, size_t size) {
  std::memset(ptr, value, size);
  return C_SUCCESS;
}

C_Status Copy(const C_Device, void* dst, const void* src, size_t size) {
  std::memcpy(dst, src, size);
  return C_SUCCESS;
}

C_Status CopyPeer(const C_Device, const C_Device, void* dst, const void* src, size_t size) {
  std::memcpy(dst, src, size);
  return C_SUCCESS;
}

C_Status AsyncCopy(const C_Device, C_Stream, void* dst, const void* src, size_t size) {
  std::memcpy(dst, src, size);
  return C_SUCCESS;
}

C_Status AsyncCopyPeer(const C_Device, const C_Device, C_Stream, void* dst, const void* src,
                       size_t size) {
  std::memcpy(dst, src, size);
  return C_SUCCESS;
}

C_Status DeviceCount(size_t* count) {
  *count = kDeviceCount;
  return C_SUCCESS;
}

C_Status DeviceList(size_t* devices) {
  for (size_t i = 0; i < kDeviceCount; ++i) devices[i] = i;
  return C_SUCCESS;
}

// The host's physical memory stands in for device memory (the allocator sizes its chunks from it).
C_Status MemoryStats(const C_Device, size_t* total, size_t* free) {
  const size_t page = sysconf(_SC_PAGESIZE);
  *total = page * sysconf(_SC_PHYS_PAGES);
  *free = page * sysconf(_SC_AVPHYS_PAGES);
  return C_SUCCESS;
}

C_Status MinChunkSize(const C_Device, size_t* size) {
  *size = 512;
  return C_SUCCESS;
}

}  // namespace

extern "C" void InitPlugin(CustomRuntimeParams* params) {
  PADDLE_CUSTOM_RUNTIME_CHECK_VERSION(params);
  params->device_type = const_cast<char*>("npu");
  params->sub_device_type = const_cast<char*>("host-memory");

  C_DeviceInterface* api = params->interface;
  std::memset(api, 0, sizeof(C_DeviceInterface));
  api->size = sizeof(C_DeviceInterface);

  api->init_device = Ok;
  api->deinit_device = Ok;
  api->set_device = SetDevice;
  api->get_device = GetDevice;
  api->synchronize_device = Ok;

  api->create_stream = CreateStream;
  api->destroy_stream = StreamOp;
  api->query_stream = StreamOp;
  api->synchronize_stream = StreamOp;
  api->stream_add_callback = StreamAddCallback;

  api->create_event = CreateEvent;
  api->record_event = RecordEvent;
  api->destroy_event = EventOp;
  api->query_event = EventOp;
  api->synchronize_event = EventOp;
  api->stream_wait_event = StreamWaitEvent;

  api->device_memory_allocate = Allocate;
  api->device_memory_deallocate = Deallocate;
  api->host_memory_allocate = Allocate;
  api->host_memory_deallocate = Deallocate;
  api->device_memory_set = MemorySet;
  api->memory_copy_h2d = Copy;
  api->memory_copy_d2h = Copy;
  api->memory_copy_d2d = Copy;
  api->memory_copy_p2p = CopyPeer;
  api->async_memory_copy_h2d = AsyncCopy;
  api->async_memory_copy_d2h = AsyncCopy;
  api->async_memory_copy_d2d = AsyncCopy;
  api->async_memory_copy_p2p = AsyncCopyPeer;

  api->get_device_count = DeviceCount;
  api->get_device_list = DeviceList;
  api->device_memory_stats = MemoryStats;
  api->device_min_chunk_size = MinChunkSize;
}
